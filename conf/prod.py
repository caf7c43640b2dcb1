# Production settings (a tornado.options-style Python file: name = value).
# Precedence: command line > environment > this file > defaults. Secrets belong in the
# environment (METRICS_SECRET), not here. Unknown names stop the proxy with exit status 2.
host = "127.0.0.1"            # nginx in front: see conf/nginx.conf
port = 8190
trust_forwarded = True        # X-Forwarded-For / X-Real-IP from nginx
comfy_url = "http://127.0.0.1:8188"
# Several ComfyUI servers instead (docs/backends.rst): each job goes to one that can run it.
# backends = [
#     {"name": "gpu0", "url": "http://10.0.0.10:8188", "weight": 2.0},
#     {"name": "gpu1", "url": "http://10.0.0.11:8188", "labels": ["sdxl"]},
# ]
store_path = "/var/lib/comfy-ws-proxy/comfy_ws_proxy.sqlite3"
jwt_jwks_url = ""             # e.g. "https://auth.example.com/.well-known/jwks.json" (or set JWT_JWKS_URL)
jwt_issuers = ["https://auth.example.com/"]
jwt_audiences = ["comfy"]
jwt_alg_allowlist = ["EdDSA"]
allowed_origins = ["https://app.example.com"]
max_connections_per_user = 1
max_queued_prompts_per_user = 100
session_timeout_ms = 1800000
max_tcp_connections = 0       # 0: what LimitNOFILE allows, 2 descriptors per user (logged at start)
first_request_timeout_s = 10.0  # a connection that sends no request header is closed after this
cleanup_interval_ms = 300000
ws_ping_interval_s = 25.0     # below nginx proxy_read_timeout (60s in conf/nginx.conf)
log_json = True
strip_comfy_errors = True     # no tracebacks, server paths or tensor dumps to clients (the log has them)
# Users' files (docs/deployment.rst, "Users' files"): per-user output folders, loaders limited to the
# user's own files, ComfyUI's cache per user. Safe without a NODE_ALLOWLIST.
isolate_users = True
file_inputs = []              # custom loaders' file inputs, e.g. ["MyLoader.path"]
shared_cache_nodes = []       # e.g. ["CheckpointLoaderSimple", "VAELoader"]: faster, but a user can
                              # tell that someone just loaded the same model
# Workflow templates (docs/templates.rst): users send {template, params} instead of a graph.
templates_dir = ""            # e.g. "/etc/comfy-ws-proxy/templates" (a copy of conf/templates to start)
# The result cache (docs/cache.rst): off by default; per user when on. Size CACHE_DIR's disk first.
result_cache = False
cache_shared = False          # True: one cache for everyone (a user can learn what another generated)
cache_max_bytes = 1073741824  # output files the entries hold (1 GiB)
cache_ttl_s = 86400
