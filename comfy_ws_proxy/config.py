"""Every option, declared once: name, type, default, help, environment names.

Sources, lowest to highest precedence: the default, the config file (``--config FILE``,
a tornado.options-style Python file of ``name = value`` lines and nothing else), environment
variables, command-line flags. The result is a frozen :class:`Settings`.

Unlike tornado.options, an unknown name in the config file is an error: a typo in
production config must stop the process, not be silently ignored.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

DEFAULT_METRICS_SECRET = "dev-metrics-secret"

# An idle keep-alive HTTP connection is closed after this long: above the keepalive_timeout of
# nginx's upstream connections (60 s by default), so nginx, not the proxy, ends them first.
# Tornado applies it to every request header, the first included (server.py; the first has
# FIRST_REQUEST_TIMEOUT_S, at most this).
IDLE_HTTP_CONNECTION_S = 75


class ConfigError(Exception):
    """A bad configuration value; ``str()`` is the one line shown to the operator."""


@dataclass(frozen=True)
class Option:
    name: str  # attribute name in Settings and config files (lower case)
    type: str  # "str" | "int" | "float" | "bool" | "list"
    default: Any
    help: str
    env: tuple[str, ...] = ()  # environment names, first one is the documented one
    required: bool = False
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    maximum: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _opt(name, type_, default, help_, *, env=None, required=False, minimum=None, choices=(), maximum=None):
    env_names = (name.upper(),) if env is None else tuple(env)
    return Option(name, type_, default, help_, env_names, required, minimum, tuple(choices), maximum)


KIB = 1024
MIB = 1024 * 1024
MAX_PORT = 65535  # a TCP port option takes minimum=0, maximum=MAX_PORT (the kernel would wrap 70000 to 4464)

OPTIONS: tuple[Option, ...] = (
    # --- server -----------------------------------------------------------------------------
    _opt("port", "int", 8190, "TCP port to listen on.", minimum=0, maximum=MAX_PORT),
    _opt("host", "str", "127.0.0.1", "Address to bind (0.0.0.0 for every interface)."),
    _opt("dev_mode", "bool", False,
         "Development mode: allows NO_VERIFY and the default metrics secret. Never in production."),
    _opt("trust_forwarded", "bool", False,
         "Trust X-Forwarded-For / X-Real-IP (run behind nginx). Off: the socket peer is the client."),
    _opt("log_json", "bool", False, "Write log lines as JSON objects."),
    _opt("loop_lag_interval_ms", "int", 500,
         "How often the IOLoop's scheduling lag is sampled (event_loop_lag_seconds).", minimum=5),
    _opt("log_level", "str", "info", "Log level.", choices=("debug", "info", "warning", "error")),
    _opt("shutdown_grace_ms", "int", 10000,
         "On SIGTERM, how long in-flight ComfyUI calls may take before the process exits.", minimum=0),
    _opt("demo_page", "bool", False, "Serve the browser demo page at /demo."),
    # --- TCP connections (before HTTP, before any upgrade) ----------------------------------
    _opt("max_tcp_connections", "int", 0,
         "TCP connections the server holds at once (HTTP and WebSocket, authenticated or not). At the cap "
         "a new one takes the place of the connection idle longest (no request yet, or keep-alive between "
         "requests); with none idle it is refused. 0: what RLIMIT_NOFILE allows at 2 descriptors each.",
         minimum=0),
    _opt("max_tcp_connections_per_address", "int", 200,
         "TCP connections one peer address may hold (0: no cap). Not for loopback peers, nor with "
         "TRUST_FORWARDED (the peer is then a proxy: limit per client there).", minimum=0),
    _opt("first_request_timeout_s", "float", 10.0,
         "A new TCP connection that has not sent a complete request header within this time is closed "
         "(at most the 75 s keep-alive idle timeout, which Tornado applies to every request header).",
         minimum=0.1, maximum=IDLE_HTTP_CONNECTION_S),
    _opt("connection_log_interval_s", "float", 10.0,
         "At most one warning per this interval about failed accepts (out of descriptors) and one about "
         "connections shed or refused at the caps; each counts what happened since the previous.",
         minimum=0.01),
    # --- ComfyUI ----------------------------------------------------------------------------
    _opt("comfy_url", "str", "", "Base URL of ComfyUI, e.g. http://127.0.0.1:8188 (required unless BACKENDS "
         "or BACKENDS_FILE names the ComfyUI servers): the one-backend shorthand, a backend named default.",
         env=("COMFY_URL", "COMFYUI_URL")),
    _opt("backends", "json", (),
         "Several ComfyUI servers: a list of {name, url, weight?, labels?} (in the config file a Python "
         "list of dicts, in the environment JSON). name: 1-32 of a-z 0-9 _ -; weight: its speed relative to "
         "the others until the proxy has measured it (default 1); labels: names a job may require.",
         env=("BACKENDS", "COMFY_BACKENDS")),
    _opt("backends_file", "str", "", "A JSON file with the BACKENDS list (for many backends)."),
    _opt("capabilities_refresh_s", "float", 300.0,
         "How often each backend's node classes, model files and system stats are read again (also at "
         "connect and after every upstream reconnect), off the request path.", minimum=1),
    _opt("failover_after_s", "float", 120.0,
         "A job placed on a backend that has been unreachable this long is moved to another one and fenced: "
         "when the old backend returns, the job is deleted from its queue or interrupted there before "
         "anything of it is delivered. Sooner, when the backend is reachable and does not hold it.",
         minimum=0.1),
    _opt("validate_prompts", "bool", True,
         "Validate every prompt against each backend's /object_info before sending it (ComfyUI 0.3.64's own "
         "checks: node classes, inputs, types, ranges, lists such as model files): a job goes only to a "
         "backend it validates on, and one that validates nowhere is refused at once with ComfyUI's "
         "node_errors. Off: ComfyUI's own answer (several backends then place by labels only)."),
    _opt("affinity_max_wait_s", "float", 10.0,
         "How long a job may wait for a busy backend that would finish it sooner (its checkpoint already "
         "loaded, or faster) while another capable backend is free; then it goes to the free one.",
         minimum=0),
    _opt("comfy_connect_timeout_ms", "int", 5000, "Connect timeout for calls to ComfyUI.", minimum=1),
    _opt("comfy_request_timeout_ms", "int", 30000, "Total timeout of one HTTP call to ComfyUI.", minimum=1),
    _opt("upstream_max_message_bytes", "int", 64 * MIB,
         "Largest frame accepted from ComfyUI (full-size SaveImageWebsocket frames exceed 8 MB).",
         minimum=1024),
    _opt("upstream_ping_interval_s", "float", 20.0,
         "Ping ComfyUI's WebSocket this often (ComfyUI never pings) to detect dead sockets.", minimum=0),
    _opt("upstream_reconnect_min_ms", "int", 250, "First upstream reconnect delay.", minimum=1),
    _opt("upstream_reconnect_max_ms", "int", 30000, "Cap of the upstream reconnect delay.", minimum=1),
    _opt("upstream_deaf_after_s", "float", 5.0,
         "An upstream socket that saw no status broadcast this long after an accepted POST no longer "
         "receives (a reused client id): it is reconnected and its jobs reconciled.", minimum=0.01),
    _opt("upstream_preview_metadata", "bool", True,
         "Ask ComfyUI for type-4 previews (they carry the prompt id, so routing is exact)."),
    # --- jobs -------------------------------------------------------------------------------
    _opt("job_watchdog_s", "float", 30.0,
         "Ask ComfyUI (/history, /queue) about a job it holds that has not been heard from for this long.",
         minimum=0.1),
    _opt("job_execution_timeout_s", "float", 0.0,
         "Execution time limit of a job (seconds from execution_start; 0: none). A job past it is "
         "interrupted and ends timed_out; a request's own timeout_s may only lower it.", minimum=0),
    _opt("resubmit_unknown", "bool", True,
         "When ComfyUI has lost a job that may have run while nobody listened (the proxy and ComfyUI "
         "failed together), send it again (true: it may run twice) or end it lost, with "
         "outcome_unknown, and tell its owner (false: never twice).", env=("RESUBMIT_UNKNOWN",)),
    _opt("max_submit_attempts", "int", 3,
         "POSTs of one prompt that ComfyUI may answer with a 5xx while it is up (a poison prompt); "
         "after that the prompt fails with comfy_error and its owner is told.", minimum=1),
    _opt("max_comfy_jobs_per_user", "int", 2,
         "Jobs of one user that ComfyUI may hold at once (running plus waiting in its queue; with several "
         "backends, this many per backend); the user's others wait in the proxy's queue, so nobody fills "
         "ComfyUI's queue. 0: no limit.", minimum=0),
    _opt("allow_front", "bool", False,
         "Let clients submit with front: true (ahead of everyone in ComfyUI's queue)."),
    _opt("backend_queue_depth", "int", 0,
         "Jobs of ours one ComfyUI may hold at once (running plus waiting in its queue); the rest wait, "
         "fairly, in the proxy, and go to whichever backend frees first. 0: automatic, 1 with several "
         "backends (late binding: a job never waits behind a busy GPU while another is idle), no limit with "
         "one.", minimum=0),
    # --- circuit breaker --------------------------------------------------------------------
    _opt("breaker_failure_threshold", "int", 5, "Consecutive failures that open the breaker.", minimum=1),
    _opt("breaker_open_ms", "int", 5000, "First open period before a half-open probe.", minimum=1),
    _opt("breaker_max_open_ms", "int", 60000, "Cap of the open period while probes keep failing.",
         minimum=1),
    _opt("breaker_probe_timeout_ms", "int", 2000, "Timeout of the GET /system_stats probe.", minimum=1),
    # --- sessions ---------------------------------------------------------------------------
    _opt("max_connections_per_user", "int", 1, "Simultaneous client sockets per user.", minimum=1),
    _opt("max_connections_per_ip", "int", 100, "Simultaneous client sockets per IP (0 = no cap).",
         minimum=0),
    _opt("session_timeout_ms", "int", 1800000, "Idle time after which a session expires.", minimum=1),
    _opt("cleanup_interval_ms", "int", 300000, "How often expired sessions are removed.", minimum=1),
    _opt("max_queued_prompts_per_user", "int", 100,
         "Prompts a user may have waiting in the proxy's queue.", minimum=1),
    _opt("finished_prompt_retention_s", "int", 86400,
         "How long finished prompts are remembered (ownership for /outputs, resume state).", minimum=1),
    _opt("resume_buffer_size", "int", 500, "Messages kept per session for resume.", minimum=0),
    _opt("prompts_state_max", "int", 200,
         "Most prompts one prompts_state answer lists: every unfinished one, then the newest finished.",
         minimum=1),
    _opt("ready_cache_ms", "int", 1000,
         "How long /ready's check of ComfyUI is reused (a flood of /ready must not become one ComfyUI "
         "request each).", minimum=0),
    _opt("resume_buffer_bytes", "int", 512 * KIB,
         "Bytes of messages kept per session for resume (the older ones go first).", minimum=0),
    _opt("store_path", "str", "comfy_ws_proxy.sqlite3",
         "SQLite file for the durable queue and prompt ownership (':memory:' for tests)."),
    # --- client limits ----------------------------------------------------------------------
    _opt("max_message_bytes", "int", 1 * MIB, "Largest client message accepted (message_too_large).",
         minimum=64),
    _opt("max_prompt_nodes", "int", 2000, "Most nodes one submitted prompt may have.", minimum=1),
    _opt("submit_rate_per_s", "float", 2.0, "Sustained prompt submissions per user per second.",
         minimum=0.001),
    _opt("submit_burst", "int", 20, "Prompt submissions a user may burst.", minimum=1),
    _opt("node_allowlist", "list", [], "If set, only these node class_types may be submitted."),
    _opt("share_comfy_status", "bool", False,
         "Forward ComfyUI's status broadcasts (its whole queue's length: every user's activity) instead "
         "of telling each user the count of their own unfinished jobs."),
    _opt("strip_comfy_errors", "bool", False,
         "Keep ComfyUI's tracebacks, server paths and tensor dumps out of what clients see of a failed or "
         "refused prompt (message, exception type and node kept; the full text is logged). On in conf/prod.py."),
    _opt("isolate_users", "bool", True,
         "Keep users' files and ComfyUI cache entries apart: outputs saved in a per-user folder, file "
         "inputs limited to the user's own files, the cache scoped per user (docs: the node policy)."),
    _opt("file_inputs", "list", [],
         "Custom nodes' inputs that name a file to read, as Class.input (ComfyUI's own are known)."),
    _opt("shared_cache_nodes", "list", [],
         "Node classes whose cached results may be shared across users (e.g. model loaders: faster, "
         "but a user can tell that someone just loaded the same model)."),
    _opt("shared_input_folder", "str", "",
         "A subfolder of ComfyUI's input folder every user may read (operator-provided assets)."),
    _opt("jobs_show_backend", "bool", False,
         "Name the backend that ran a job in the jobs API's answers (operators' choice: it tells users about "
         "the infrastructure)."),
    _opt("max_wait_s", "float", 60.0,
         "Longest wait a jobs API request may ask for with Prefer: wait=N.", minimum=0),
    _opt("idempotency_key_ttl_s", "int", 86400,
         "How long an Idempotency-Key's answer is kept and replayed (jobs API).", minimum=1),
    _opt("max_event_streams_per_user", "int", 8,
         "Job event streams (GET /job/{id}/events) one user may have open at once.", minimum=1),
    _opt("sse_heartbeat_s", "float", 15.0,
         "A comment is sent on an idle event stream this often (keeps proxies from closing it).",
         minimum=0.01),
    _opt("sse_log_events", "int", 1000,
         "Events kept per watched job for Last-Event-ID resume (beyond: a snapshot).", minimum=1),
    _opt("sse_log_retention_s", "float", 600.0,
         "How long a watched job's events are kept after it ended.", minimum=0),
    _opt("public_url", "str", "",
         "The proxy's public base URL (with any path prefix), for absolute links in webhooks; empty: paths."),
    _opt("webhook_secrets", "list", [],
         "Webhook signing secrets, whsec_<base64> (comma-separated: each signs, for key rotation); "
         "empty: webhooks are off."),
    _opt("webhook_default_url", "str", "", "Webhook URL of jobs that name none (empty: none)."),
    _opt("webhook_url_allowlist", "list", [],
         "If set, a job's webhook_url must start with one of these prefixes."),
    _opt("webhook_allow_private_hosts", "list", [],
         "Webhook hosts allowed although they resolve to loopback/private addresses (e.g. an internal "
         "service)."),
    _opt("webhook_timeout_s", "float", 15.0, "Timeout of one webhook delivery attempt.", minimum=0.1),
    _opt("webhook_max_in_flight", "int", 8, "Webhook deliveries in progress at once.", minimum=1),
    _opt("upload_max_bytes", "int", 20 * MIB, "Largest image POST /upload accepts.", minimum=1024),
    _opt("max_concurrent_uploads", "int", 8, "Uploads being received at once (each is held in memory).",
         minimum=1),
    _opt("upload_dir", "str", "",
         "Where uploads are kept, per user (empty: STORE_PATH + '.uploads'; with ':memory:', a temporary "
         "folder)."),
    # --- workflow templates (docs/templates.rst) ----------------------------------------------
    _opt("templates_dir", "str", "",
         "A directory of workflow templates, one <name>.json file each (empty: no templates)."),
    _opt("templates_reload_interval_s", "float", 5.0,
         "How often the templates' files are looked at for changes (a stat each; changed ones are "
         "reloaded). 0: only at start.", minimum=0),
    _opt("templates_max_count", "int", 200,
         "Most templates served (the first by file name; the others are reported as broken).", minimum=1),
    _opt("templates_max_file_bytes", "int", 1 * MIB,
         "Largest template file read (a larger one is reported as broken).", minimum=1024),
    # --- the result cache (jobs/cache.py, docs/cache.rst) ------------------------------------
    _opt("result_cache", "bool", False,
         "Answer a prompt identical to one that succeeded from the proxy's copy of its outputs, without "
         "ComfyUI; identical prompts in flight share one execution (docs/cache.rst)."),
    _opt("cache_shared", "bool", False,
         "One result cache for every user (off: per user). Lets a user learn what another generated."),
    _opt("cache_dir", "str", "",
         "Where the cached output files are kept (empty: STORE_PATH + '.cache'; with ':memory:', a "
         "temporary folder)."),
    _opt("cache_max_entries", "int", 10000, "Results the cache keeps (least recently used go first).",
         minimum=1),
    _opt("cache_max_bytes", "int", 1024 * MIB, "Bytes of output files the cache's entries may hold.",
         minimum=1),
    _opt("cache_max_entry_bytes", "int", 256 * MIB,
         "A result whose files are larger than this is not cached.", minimum=1),
    _opt("cache_max_input_bytes", "int", 64 * MIB,
         "An input file only the backend has is hashed (fetched through /view) up to this size; a larger "
         "one makes the prompt uncacheable.", minimum=1),
    _opt("cache_ttl_s", "int", 86400, "How long a cached result answers.", minimum=1),
    _opt("cache_uncacheable_nodes", "list", [],
         "More node classes whose outputs are not a pure function of their inputs (never cached; "
         "ComfyUI's own are known)."),
    _opt("max_downloads_per_user", "int", 4,
         "/outputs downloads one user may have in progress at once (too_many_downloads).", minimum=1),
    _opt("download_stall_timeout_s", "float", 30.0,
         "A download whose client has read nothing for this long is ended.", minimum=0.1),
    _opt("max_outbound_buffer_bytes", "int", 1 * MIB,
         "Unsent bytes a client may owe before it is closed as too slow.", minimum=64 * KIB),
    _opt("ws_ping_interval_s", "float", 25.0,
         "Ping clients this often (keep below nginx proxy_read_timeout).", minimum=0),
    _opt("ws_ping_timeout_s", "float", 20.0,
         "Close a client that has not answered a ping within this time (<= ws_ping_interval_s).", minimum=0),
    _opt("max_concurrent_upgrades", "int", 32,
         "Upgrades (token check and handshake) in progress at once; the rest wait their turn.", minimum=1),
    _opt("handshake_timeout_ms", "int", 10000, "Time allowed for the upgrade and JWT checks.",
         minimum=1),
    # --- auth -------------------------------------------------------------------------------
    _opt("no_verify", "bool", False,
         "DEVELOPMENT ONLY: accept any token and take sub unverified (needs dev_mode)."),
    _opt("jwt_issuers", "list", [], "Allowed iss values (comma-separated); empty: any."),
    _opt("jwt_audiences", "list", [], "Allowed aud values (comma-separated); empty: aud not checked."),
    _opt("jwt_alg_allowlist", "list", ["EdDSA"], "Accepted JWT algorithms (comma-separated)."),
    _opt("jwt_jwks_url", "str", "", "URL of the issuer's JWKS (fetched asynchronously and cached)."),
    _opt("jwt_key_file", "str", "", "Local JWKS (.json) or PEM public key file, for single-machine setups."),
    _opt("jwt_leeway_s", "int", 30,
         "Clock skew allowed for exp/nbf/iat: a token is accepted, and its connection kept, until this long "
         "after its exp.", minimum=0),
    _opt("token_expiry_warning_s", "float", 60.0,
         "Send token_expiring this long before a connection's token stops being good (exp + jwt_leeway_s), "
         "but not before half its remaining life has passed; the client answers with refresh_token. "
         "0: no warning.", minimum=0),
    _opt("jwks_cache_ttl_s", "int", 300, "How long fetched JWKS keys are fresh.", minimum=1),
    _opt("jwks_min_refetch_interval_s", "int", 30,
         "At most one JWKS fetch per this interval, whatever unknown kids arrive.", minimum=0),
    _opt("allow_query_token", "bool", False,
         "Accept ?token= on /ws (URLs reach logs; prefer the subprotocol)."),
    _opt("allowed_origins", "list", [],
         "Origins allowed to open /ws from a browser; empty: same host only; '*': any."),
    _opt("metrics_secret", "str", DEFAULT_METRICS_SECRET,
         "Bearer secret for /metrics. The default works only in dev_mode."),
    _opt("metrics_public", "bool", False,
         "Serve the Prometheus text at /metrics/prometheus without the secret."),
)

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}

Settings = dataclasses.make_dataclass(
    "Settings",
    [(o.name, Any, dataclasses.field(default=o.default if not isinstance(o.default, list) else tuple(o.default)))
     for o in OPTIONS],
    frozen=True,
)
Settings.__doc__ = "The validated, frozen configuration. Build it with load_settings() or settings_for_tests()."
Settings.replace = lambda self, **changes: dataclasses.replace(self, **changes)  # type: ignore[attr-defined]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(option: Option, raw: Any, where: str) -> Any:
    """Turn a raw value (a string from env/CLI, or a Python value from a file) into the option's type."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{option.name.upper()} ({where}): {why}")

    kind = option.type
    if kind == "bool":
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            value = raw.strip().lower() in _TRUE
        else:
            raise bad(f"expected true or false, got {raw!r}")
    elif kind == "int":
        if isinstance(raw, bool):
            raise bad(f"expected an integer, got {raw!r}")
        try:
            value = int(raw.strip()) if isinstance(raw, str) else int(raw)
            if not isinstance(raw, (str, int)):
                raise ValueError
        except (TypeError, ValueError):
            raise bad(f"expected an integer, got {raw!r}") from None
    elif kind == "float":
        if isinstance(raw, bool):
            raise bad(f"expected a number, got {raw!r}")
        try:
            value = float(raw.strip()) if isinstance(raw, str) else float(raw)
        except (TypeError, ValueError):
            raise bad(f"expected a number, got {raw!r}") from None
    elif kind == "json":
        if isinstance(raw, str):
            import json
            try:
                raw = json.loads(raw) if raw.strip() else []
            except ValueError as e:
                raise bad(f"expected JSON ({e})") from None
        if not isinstance(raw, (list, tuple)) or not all(isinstance(p, dict) for p in raw):
            raise bad(f"expected a list of objects, got {raw!r:.200}")
        value = tuple(dict(p) for p in raw)
    elif kind == "list":
        if isinstance(raw, str):
            value = tuple(part.strip() for part in raw.split(",") if part.strip())
        elif isinstance(raw, (list, tuple)) and all(isinstance(p, str) for p in raw):
            value = tuple(raw)
        else:
            raise bad(f"expected a comma-separated list, got {raw!r}")
    else:
        if not isinstance(raw, str):
            raise bad(f"expected a string, got {raw!r}")
        value = raw.strip()
    low, high = option.minimum, option.maximum
    if low is not None and high is not None and not low <= value <= high:
        raise bad(f"must be between {low:g} and {high:g}, got {value!r}")
    if low is not None and value < low:
        raise bad(f"must be at least {low:g}, got {value!r}")
    if high is not None and value > high:
        raise bad(f"must be at most {high:g}, got {value!r}")
    if option.choices and value not in option.choices:
        raise bad(f"must be one of {', '.join(option.choices)}, got {value!r}")
    return value


def read_config_file(path: str) -> dict[str, Any]:
    """Execute a tornado.options-style file and return its option assignments.

    Only ``name = value`` lines (and imports, and strings as comments) are allowed: a
    statement that binds no name, such as ``port: 8190`` (a Python annotation, not an
    assignment), would otherwise be silently ignored. Names starting with an underscore and
    imported modules are ignored; any other unknown name is an error (tornado.options would
    silently ignore the typo).
    """
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text ({e.reason})") from None
    try:
        tree = ast.parse(source, path)
    except (SyntaxError, ValueError) as e:  # a syntax error in config must become one clear line
        raise ConfigError(f"--config {path}: {type(e).__name__}: {e}") from None
    for statement in tree.body:
        _check_statement(statement, source, path)
    namespace: dict[str, Any] = {"__file__": path}
    try:
        exec(compile(tree, path, "exec"), namespace)  # noqa: S102 - operator-owned config file
    except Exception as e:  # an error while running the file must become one clear line too
        raise ConfigError(f"--config {path}: {type(e).__name__}: {e}") from None
    values = {}
    for name, value in namespace.items():
        if name.startswith("_") or type(value).__name__ == "module":
            continue
        key = name.lower()
        if key not in OPTIONS_BY_NAME:
            raise ConfigError(f"{name} ({path}): unknown option; see --help for the list")
        values[key] = value
    return values


def _check_statement(node: ast.stmt, source: str, path: str) -> None:
    """Refuse a top-level statement of a config file that is not ``name = value``."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return  # a docstring
    if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
        return
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        return  # name: type = value still assigns
    text = (ast.get_source_segment(source, node) or "").splitlines()[0:1]
    shown = repr(text[0]) if text else "a statement"
    where = f"{path}:{node.lineno}"
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        name = node.target.id
        hint = ast.get_source_segment(source, node.annotation) or "..."
        raise ConfigError(f"{name} ({where}): {shown} is a Python annotation, not an assignment, "
                          f"and would be ignored; write {name} = {hint}")
    raise ConfigError(f"--config {where}: {shown} is not a name = value line")


def _parse_argv(argv: Sequence[str]) -> tuple[str | None, dict[str, str], bool]:
    """Return (config path, {option: raw value}, help requested). Accepts --flag=value and --flag value."""
    config_path = None
    values: dict[str, str] = {}
    want_help = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help"):
            want_help = True
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: unexpected argument; options look like --name=value")
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_").lower()
        if key != "config" and key not in OPTIONS_BY_NAME:
            raise ConfigError(f"--{name}: unknown option; see --help for the list")
        if not eq:
            option = OPTIONS_BY_NAME.get(key)
            if option is not None and option.type == "bool" and (i >= len(args) or args[i].startswith("--")):
                value = "true"  # a bare boolean flag
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise ConfigError(f"--{name}: missing value")
        if key == "config":
            config_path = value
        else:
            values[key] = value
    return config_path, values, want_help


def help_text() -> str:
    lines = ["usage: comfy-ws-proxy [--config FILE] [--option=value ...]", "",
             "Precedence: command line > environment > config file > default.", "",
             "Options (flag / environment variable / default):"]
    for o in OPTIONS:
        default = ",".join(o.default) if isinstance(o.default, list) else o.default
        if o.name == "metrics_secret":
            default = "(development default)"
        req = " REQUIRED" if o.required else ""
        lines.append(f"  {o.flag:<34} {o.env[0]:<30} [{default}]{req}")
        lines.append(f"      {o.help}")
    lines.append(f"  {'--config FILE':<34} {'':<30} a Python file of name = value lines, e.g. conf/prod.py")
    return "\n".join(lines)


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
                  ) -> "Settings":
    """Build Settings from argv and environ. Raises ConfigError, or SystemExit(0) after --help."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    config_path, cli_values, want_help = _parse_argv(argv)
    if want_help:
        print(help_text())
        raise SystemExit(0)
    if config_path is None:
        config_path = environ.get("COMFY_WS_PROXY_CONFIG") or None

    values: dict[str, Any] = {}
    if config_path:
        for key, raw in read_config_file(config_path).items():
            values[key] = _convert(OPTIONS_BY_NAME[key], raw, config_path)
    for option in OPTIONS:
        for env_name in option.env:
            if env_name in environ:
                values[option.name] = _convert(option, environ[env_name], f"environment {env_name}")
                break
    for key, raw in cli_values.items():
        values[key] = _convert(OPTIONS_BY_NAME[key], raw, "command line")
    return build_settings(values)


def build_settings(values: Mapping[str, Any]) -> "Settings":
    """Fill defaults, check required options and cross-option rules, freeze."""
    merged = {}
    for o in OPTIONS:
        value = values.get(o.name, o.default)
        merged[o.name] = tuple(value) if isinstance(value, list) else value
    settings = Settings(**merged)
    validate(settings)
    return settings


def _check_webhook_secret(secret: str) -> None:
    """The Standard Webhooks form: whsec_ and the base64 of 24 to 64 random bytes."""
    import base64
    import binascii

    try:
        key = base64.b64decode(secret[len("whsec_"):], validate=True) if secret.startswith("whsec_") else b""
    except (binascii.Error, ValueError):
        key = b""
    if not 24 <= len(key) <= 64:
        raise ConfigError("WEBHOOK_SECRETS: each secret is whsec_<base64 of 24 to 64 random bytes>, e.g. "
                          "whsec_$(head -c 32 /dev/urandom | base64)")


def validate(s: "Settings") -> None:
    """Rules that involve more than one option or a value's shape."""
    from urllib.parse import urlsplit

    backend_specs(s)  # COMFY_URL, or BACKENDS / BACKENDS_FILE
    if s.no_verify and not s.dev_mode:
        raise ConfigError("NO_VERIFY: true is refused unless DEV_MODE=true (it accepts forged tokens)")
    if not s.dev_mode and s.metrics_secret == DEFAULT_METRICS_SECRET:
        raise ConfigError("METRICS_SECRET: set a secret of your own (the default works only with DEV_MODE=true)")
    if len(s.metrics_secret) < 8 and not s.dev_mode:
        raise ConfigError("METRICS_SECRET: too short, use at least 8 characters")
    if not s.no_verify and not (s.jwt_jwks_url or s.jwt_key_file):
        raise ConfigError("JWT_JWKS_URL: set it or JWT_KEY_FILE so tokens can be verified")
    if s.jwt_jwks_url:
        jwks = urlsplit(s.jwt_jwks_url)
        if jwks.scheme not in ("http", "https") or not jwks.hostname:
            raise ConfigError(f"JWT_JWKS_URL: expected an http(s) URL, got {s.jwt_jwks_url!r}")
        _check_url_port("JWT_JWKS_URL", s.jwt_jwks_url)
        if jwks.scheme == "http" and not s.dev_mode and not _is_loopback(jwks.hostname):
            raise ConfigError("JWT_JWKS_URL: plain http is refused outside DEV_MODE (whoever is on the path "
                              "could swap the keys and forge any token); use https, or a loopback address")
    bad_algs = [a for a in s.jwt_alg_allowlist if a.lower() == "none" or a.upper().startswith("HS")]
    if bad_algs:
        raise ConfigError(f"JWT_ALG_ALLOWLIST: {', '.join(bad_algs)} not allowed (only public-key algorithms)")
    if not s.jwt_alg_allowlist:
        raise ConfigError("JWT_ALG_ALLOWLIST: must name at least one algorithm")
    for secret in s.webhook_secrets:
        _check_webhook_secret(secret)
    for name in ("webhook_default_url", "public_url"):
        value = getattr(s, name)
        if value and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
            raise ConfigError(f"{name.upper()}: expected an http(s) URL, got {value!r}")
    if s.webhook_default_url and not s.webhook_secrets:
        raise ConfigError("WEBHOOK_DEFAULT_URL: needs WEBHOOK_SECRETS (deliveries are signed)")
    if s.upstream_reconnect_max_ms < s.upstream_reconnect_min_ms:
        raise ConfigError("UPSTREAM_RECONNECT_MAX_MS: must be >= UPSTREAM_RECONNECT_MIN_MS")
    if s.ws_ping_interval_s and s.ws_ping_timeout_s > s.ws_ping_interval_s:
        raise ConfigError("WS_PING_TIMEOUT_S: must be <= WS_PING_INTERVAL_S")
    if s.breaker_max_open_ms < s.breaker_open_ms:
        raise ConfigError("BREAKER_MAX_OPEN_MS: must be >= BREAKER_OPEN_MS")
    if (not s.trust_forwarded and s.max_tcp_connections_per_address and s.max_connections_per_ip
            and s.max_connections_per_ip > s.max_tcp_connections_per_address):
        raise ConfigError(f"MAX_CONNECTIONS_PER_IP: {s.max_connections_per_ip} WebSockets per address cannot fit "
                          f"in MAX_TCP_CONNECTIONS_PER_ADDRESS={s.max_tcp_connections_per_address} TCP connections")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    url: str
    weight: float = 1.0
    labels: tuple[str, ...] = ()


_BACKEND_NAME = __import__("re").compile(r"[a-z0-9_-]{1,32}")


def backend_specs(s: "Settings") -> list[BackendSpec]:
    """The ComfyUI servers: BACKENDS, else BACKENDS_FILE, else COMFY_URL (one named default)."""
    import json
    from urllib.parse import urlsplit

    where = "BACKENDS"
    raw = list(s.backends)
    if not raw and s.backends_file:
        where = "BACKENDS_FILE"
        try:
            with open(s.backends_file, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"BACKENDS_FILE: cannot read {s.backends_file!r}: {e}") from None
        if not isinstance(raw, list) or not raw or not all(isinstance(p, dict) for p in raw):
            raise ConfigError("BACKENDS_FILE: expected a JSON list of {name, url, weight?, labels?} objects")
    if not raw:
        if not s.comfy_url:
            raise ConfigError("COMFY_URL: required (the ComfyUI base URL, e.g. http://127.0.0.1:8188), "
                              "or BACKENDS for several")
        raw = [{"name": "default", "url": s.comfy_url}]
        where = "COMFY_URL"
    specs, names = [], set()
    for i, item in enumerate(raw):
        unknown = set(item) - {"name", "url", "weight", "labels"}
        if unknown:
            raise ConfigError(f"{where}[{i}]: unknown field(s) {', '.join(sorted(unknown))}")
        name, url = item.get("name"), item.get("url")
        if not isinstance(name, str) or not _BACKEND_NAME.fullmatch(name):
            raise ConfigError(f"{where}[{i}]: name must be 1-32 of a-z 0-9 _ -, got {name!r}")
        if name in names:
            raise ConfigError(f"{where}[{i}]: the name {name!r} is used twice")
        names.add(name)
        label = where if where == "COMFY_URL" else f"{where}[{i}] ({name})"
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{label}: expected an http(s) URL like http://127.0.0.1:8188, got {url!r}")
        _check_url_port(label, url)
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000:
            raise ConfigError(f"{label}: weight must be a number in (0, 1000], got {weight!r}")
        labels = item.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            raise ConfigError(f"{label}: labels must be a list of names, got {labels!r}")
        specs.append(BackendSpec(name, url.rstrip("/"), float(weight), tuple(labels)))
    return specs


def _check_url_port(name: str, url: str) -> None:
    from urllib.parse import urlsplit

    try:
        urlsplit(url).port  # raises for a port outside 0..65535 or one that is not a number
    except ValueError:
        raise ConfigError(f"{name}: the port must be a number from 0 to {MAX_PORT}, got {url!r}") from None


def _is_loopback(host: str) -> bool:
    """Is ``host`` this machine (a literal loopback address, or ``localhost``)? A name other
    than localhost is not trusted: resolving it is exactly what an attacker on the path controls."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_for_tests(**overrides: Any) -> "Settings":
    """Settings for in-process tests: dev mode, in-memory store, unless overridden."""
    values = {"comfy_url": "http://127.0.0.1:1", "dev_mode": True, "store_path": ":memory:",
              "no_verify": False, "jwt_key_file": "", "jwt_jwks_url": ""}
    values.update(overrides)
    merged = {}
    for o in OPTIONS:
        value = values.get(o.name, o.default)
        merged[o.name] = tuple(value) if isinstance(value, list) else value
    return Settings(**merged)


def describe(settings: "Settings") -> Iterable[tuple[str, Any]]:
    """(name, value) pairs with secrets masked, for the start-up log."""
    for o in OPTIONS:
        value = getattr(settings, o.name)
        if o.name == "metrics_secret":
            value = "***"
        yield o.name, value


__all__ = ["BackendSpec", "backend_specs", "ConfigError", "OPTIONS", "Option", "Settings", "load_settings",
           "build_settings", "settings_for_tests", "help_text", "describe", "DEFAULT_METRICS_SECRET"]

