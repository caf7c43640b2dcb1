"""A configuration that cannot work stops the process at start with one line and exit status 2
(systemd's RestartPreventExitStatus=2 then does not restart it every 2 s); a legal but
suspicious one that can only be seen later is logged."""
import os
import subprocess
import sys

import pytest

from comfy_ws_proxy.config import MAX_PORT, OPTIONS, ConfigError, load_settings

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEV = {"COMFY_URL": "http://127.0.0.1:1", "DEV_MODE": "true", "STORE_PATH": ":memory:"}
PROD = {"COMFY_URL": "http://127.0.0.1:1", "METRICS_SECRET": "a-real-secret-value"}


def run_proxy(args, env, cwd):
    """``python -m comfy_ws_proxy`` as an operator runs it; the result of a start that fails."""
    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-m", "comfy_ws_proxy", *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("comfy-ws-proxy: error: ")
    return lines[0]


# --- ports ---------------------------------------------------------------------------------

def test_a_port_outside_0_to_65535_is_refused(tmp_path):
    line = one_line_error(run_proxy(["--port", "70000"], dict(DEV, NO_VERIFY="true"), tmp_path))
    assert "PORT" in line and "65535" in line and "70000" in line
    base = dict(DEV, NO_VERIFY="true")
    with pytest.raises(ConfigError, match="PORT.*between 0 and 65535"):
        load_settings([], dict(base, PORT="-1"))
    conf = tmp_path / "conf.py"
    conf.write_text("port = 65536\n")
    with pytest.raises(ConfigError, match="PORT.*between 0 and 65535"):
        load_settings(["--config", str(conf)], base)
    assert load_settings(["--port=0"], base).port == 0
    assert load_settings(["--port=65535"], base).port == 65535


def test_every_port_like_option_is_bounded():
    ports = [o for o in OPTIONS if o.name == "port" or o.name.endswith("_port")]
    assert ports
    for option in ports:
        assert (option.type, option.minimum, option.maximum) == ("int", 0, MAX_PORT), option.name


def test_ports_inside_urls_are_checked():
    base = dict(DEV, NO_VERIFY="true")
    with pytest.raises(ConfigError, match="COMFY_URL.*port"):
        load_settings([], dict(base, COMFY_URL="http://127.0.0.1:70000"))
    with pytest.raises(ConfigError, match="JWT_JWKS_URL.*port"):
        load_settings([], dict(base, JWT_JWKS_URL="https://auth.example:99999/jwks.json"))


# --- the config file -----------------------------------------------------------------------

def test_an_annotation_in_the_config_file_is_refused_not_ignored(tmp_path):
    conf = tmp_path / "conf.py"
    conf.write_text('comfy_url = "http://127.0.0.1:1"\ndev_mode = True\nno_verify = True\nport: 8191\n')
    line = one_line_error(run_proxy(["--config", str(conf)], {"STORE_PATH": ":memory:"}, tmp_path))
    assert f"{conf}:4" in line and "annotation" in line and "port = 8191" in line


@pytest.mark.parametrize("statement", ["port == 8191", "port", "if True:\n    port = 8191", "port += 1",
                                       "a, b = 1, 2", "settings.port = 8191", "def f():\n    pass"])
def test_anything_but_name_equals_value_is_refused(tmp_path, statement):
    conf = tmp_path / "conf.py"
    conf.write_text(f"port = 8190\n{statement}\n")
    with pytest.raises(ConfigError, match=f"{conf}:2: .* is not a name = value line"):
        load_settings(["--config", str(conf)], dict(DEV, NO_VERIFY="true"))


def test_what_config_files_may_hold_still_loads(tmp_path):
    conf = tmp_path / "conf.py"
    conf.write_text('"""Our settings."""\nimport os\n_base = "/var/lib"\n# a comment\n'
                    'port: int = 8191\nstore_path = os.path.join(_base, "x.sqlite3")\n')
    s = load_settings(["--config", str(conf)], {"COMFY_URL": "http://127.0.0.1:1", "DEV_MODE": "true",
                                                 "NO_VERIFY": "true"})
    assert s.port == 8191 and s.store_path == "/var/lib/x.sqlite3"


# --- JWT_JWKS_URL over plain http ---------------------------------------------------------

def test_a_plain_http_jwks_url_is_refused_outside_dev_mode_unless_on_loopback():
    with pytest.raises(ConfigError, match="JWT_JWKS_URL: plain http is refused outside DEV_MODE"):
        load_settings([], dict(PROD, JWT_JWKS_URL="http://auth.example.com/.well-known/jwks.json"))
    with pytest.raises(ConfigError, match="plain http"):
        load_settings([], dict(PROD, JWT_JWKS_URL="http://10.0.0.7:8080/jwks.json"))
    for url in ("https://auth.example.com/.well-known/jwks.json", "http://127.0.0.1:8080/jwks.json",
                "http://[::1]:8080/jwks.json", "http://localhost:8080/jwks.json"):
        assert load_settings([], dict(PROD, JWT_JWKS_URL=url)).jwt_jwks_url == url
    dev = load_settings([], dict(PROD, DEV_MODE="true", JWT_JWKS_URL="http://auth.example.com/jwks.json"))
    assert dev.jwt_jwks_url == "http://auth.example.com/jwks.json"
