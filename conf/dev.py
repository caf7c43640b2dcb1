# Development settings: one machine, the bundled simulator or a local ComfyUI.
# Used by scripts/quickstart.sh. Never in production (dev_mode relaxes safety checks).
dev_mode = True
host = "127.0.0.1"
port = 8190
comfy_url = "http://127.0.0.1:8188"
jwt_key_file = "dev/dev_jwks.json"   # written by scripts/dev_token.py
store_path = "dev/comfy_ws_proxy.sqlite3"
max_connections_per_user = 4
demo_page = True
templates_dir = "conf/templates"     # the shipped workflow templates (docs/templates.rst): text2img
