"""Configuration: precedence, validation, and the one-line exit 2 on bad config."""
import os
import subprocess
import sys

import pytest

from comfy_ws_proxy.config import OPTIONS, ConfigError, load_settings

BASE_ENV = {"COMFY_URL": "http://127.0.0.1:8188", "DEV_MODE": "true", "NO_VERIFY": "true"}


def write(tmp_path, text, name="conf.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_named_in_the_issue():
    s = load_settings([], BASE_ENV)
    assert s.port == 8190
    assert s.max_connections_per_user == 1
    assert s.session_timeout_ms == 1800000
    assert s.cleanup_interval_ms == 300000
    assert s.max_queued_prompts_per_user == 100
    assert s.no_verify is True
    assert s.jwt_alg_allowlist == ("EdDSA",)
    assert s.breaker_failure_threshold == 5


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    conf = write(tmp_path, "port = 1111\nmax_connections_per_user = 3\nsession_timeout_ms = 5\n")
    env = dict(BASE_ENV, PORT="2222", MAX_CONNECTIONS_PER_USER="4")
    s = load_settings(["--config", conf, "--port=3333"], env)
    assert s.port == 3333                      # CLI wins
    assert s.max_connections_per_user == 4     # env over file
    assert s.session_timeout_ms == 5           # file over default
    assert s.cleanup_interval_ms == 300000     # default


def test_lists_are_comma_separated(tmp_path):
    s = load_settings(["--jwt-issuers", "https://a, https://b", "--jwt-audiences=x"], BASE_ENV)
    assert s.jwt_issuers == ("https://a", "https://b")
    assert s.jwt_audiences == ("x",)


def test_unknown_name_in_config_file_is_an_error(tmp_path):
    conf = write(tmp_path, "max_conections_per_user = 3\n")
    with pytest.raises(ConfigError, match="max_conections_per_user.*unknown option"):
        load_settings(["--config", conf], BASE_ENV)


def test_malformed_values_name_the_option():
    with pytest.raises(ConfigError, match="PORT.*integer"):
        load_settings(["--port=eighty"], BASE_ENV)
    with pytest.raises(ConfigError, match="NO_VERIFY.*true or false"):
        load_settings([], dict(BASE_ENV, NO_VERIFY="maybe"))
    with pytest.raises(ConfigError, match="MAX_CONNECTIONS_PER_USER.*at least 1"):
        load_settings(["--max-connections-per-user=0"], BASE_ENV)


def test_cross_option_rules():
    with pytest.raises(ConfigError, match="COMFY_URL"):
        load_settings([], {"DEV_MODE": "true", "NO_VERIFY": "true"})
    with pytest.raises(ConfigError, match="NO_VERIFY.*DEV_MODE"):
        load_settings([], {"COMFY_URL": "http://x:1", "NO_VERIFY": "true", "METRICS_SECRET": "s3cret-long"})
    with pytest.raises(ConfigError, match="METRICS_SECRET"):
        load_settings([], {"COMFY_URL": "http://x:1", "JWT_KEY_FILE": "k.json"})
    with pytest.raises(ConfigError, match="JWT_ALG_ALLOWLIST"):
        load_settings(["--jwt-alg-allowlist=HS256"], BASE_ENV)
    with pytest.raises(ConfigError, match="JWT_JWKS_URL"):
        load_settings([], {"COMFY_URL": "http://x:1", "METRICS_SECRET": "s3cret-long"})


def test_every_option_has_help_and_a_typed_default():
    for option in OPTIONS:
        assert option.help and option.env and option.type in ("str", "int", "float", "bool", "list", "json")


def test_backends_come_from_backends_a_file_or_comfy_url(tmp_path):
    from comfy_ws_proxy.config import BackendSpec, backend_specs
    env = {"DEV_MODE": "true", "NO_VERIFY": "true"}
    one = load_settings([], {**env, "COMFY_URL": "http://127.0.0.1:8188/"})
    assert backend_specs(one) == [BackendSpec("default", "http://127.0.0.1:8188")]
    listed = '[{"name": "gpu0", "url": "http://10.0.0.1:8188", "weight": 2, "labels": ["sdxl"]}, ' \
             '{"name": "gpu1", "url": "http://10.0.0.2:8188"}]'
    many = load_settings([], {**env, "BACKENDS": listed, "COMFY_URL": "http://127.0.0.1:8188"})
    assert backend_specs(many) == [BackendSpec("gpu0", "http://10.0.0.1:8188", 2.0, ("sdxl",)),
                                   BackendSpec("gpu1", "http://10.0.0.2:8188")]
    path = tmp_path / "backends.json"
    path.write_text(listed)
    assert backend_specs(load_settings([], {**env, "BACKENDS_FILE": str(path)})) == backend_specs(many)
    conf = write(tmp_path, 'backends = [{"name": "a", "url": "http://127.0.0.1:1"}]\n'
                           'dev_mode = True\nno_verify = True\n')
    assert [b.name for b in backend_specs(load_settings(["--config", conf], {}))] == ["a"]


@pytest.mark.parametrize("value, message", [
    ('[{"name": "a", "url": "http://x:1"}, {"name": "a", "url": "http://y:1"}]', "used twice"),
    ('[{"name": "GPU 0", "url": "http://x:1"}]', "name must be"),
    ('[{"name": "a", "url": "ftp://x"}]', "http(s) URL"),
    ('[{"name": "a", "url": "http://x:99999"}]', "port"),
    ('[{"name": "a", "url": "http://x:1", "weight": 0}]', "weight"),
    ('[{"name": "a", "url": "http://x:1", "labels": "sdxl"}]', "labels"),
    ('[{"name": "a", "url": "http://x:1", "gpu": 1}]', "unknown field"),
    ('{"name": "a"}', "list of objects"),
    ('[{"name": ', "expected JSON"),
])
def test_a_bad_backends_list_is_one_clear_line(value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings([], {"DEV_MODE": "true", "NO_VERIFY": "true", "BACKENDS": value})


def test_without_comfy_url_or_backends_the_proxy_does_not_start():
    with pytest.raises(ConfigError, match="COMFY_URL: required"):
        load_settings([], {"DEV_MODE": "true", "NO_VERIFY": "true"})


def run(args, env=None, cwd=None):
    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.getcwd()}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "comfy_ws_proxy", *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_config_typo_stops_the_process_with_one_clear_line(tmp_path):
    conf = write(tmp_path, 'comfy_url = "http://127.0.0.1:8188"\nmetrcs_secret = "x"\n')
    result = run(["--config", conf])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "metrcs_secret" in lines[0] and "unknown option" in lines[0]


def test_missing_comfy_url_and_malformed_value_exit_2():
    result = run([])
    assert result.returncode == 2 and "COMFY_URL" in result.stderr
    result = run(["--port=x"], {"COMFY_URL": "http://127.0.0.1:1"})
    assert result.returncode == 2 and "PORT" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_lists_every_option():
    result = run(["--help"])
    assert result.returncode == 0
    for option in OPTIONS:
        assert option.flag in result.stdout and option.env[0] in result.stdout


def test_shipped_conf_files_load():
    root = os.path.join(os.path.dirname(__file__), "..")
    env = {"METRICS_SECRET": "a-real-secret-value", "JWT_KEY_FILE": "x.json"}
    s = load_settings(["--config", os.path.join(root, "conf", "prod.py")], env)
    assert s.dev_mode is False and s.trust_forwarded is True
    s = load_settings(["--config", os.path.join(root, "conf", "dev.py")], {})
    assert s.dev_mode is True
