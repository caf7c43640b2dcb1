"""A configuration that cannot work stops the process at start with one line and exit status 2
(systemd's RestartPreventExitStatus=2 then does not restart it every 2 s); a legal but
suspicious one that can only be seen later is logged."""
import json
import logging
import os
import subprocess
import sys

import jwt
import pytest
import tornado.web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from comfy_ws_proxy.auth import JwksCache, KeySetupError, build_verifier
from comfy_ws_proxy.config import MAX_PORT, OPTIONS, ConfigError, load_settings, settings_for_tests
from comfy_ws_proxy.testing.tokens import DevKey

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


def pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- STORE_PATH ----------------------------------------------------------------------------

def test_a_store_path_in_a_missing_folder_or_naming_a_folder_is_one_line(tmp_path):
    missing = tmp_path / "no-such-folder" / "store.sqlite3"
    line = one_line_error(run_proxy([], dict(DEV, NO_VERIFY="true", STORE_PATH=str(missing)), tmp_path))
    assert "STORE_PATH" in line and f"{tmp_path / 'no-such-folder'} does not exist" in line
    line = one_line_error(run_proxy([], dict(DEV, NO_VERIFY="true", STORE_PATH=str(tmp_path)), tmp_path))
    assert "STORE_PATH" in line and f"{tmp_path} is a directory" in line
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("hello\n" * 200)
    line = one_line_error(run_proxy([], dict(DEV, NO_VERIFY="true", STORE_PATH=str(not_a_database)), tmp_path))
    assert "STORE_PATH" in line and "cannot open as an SQLite database" in line


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


# --- JWT_KEY_FILE and the algorithm allowlist ---------------------------------------------

def test_a_garbage_key_file_says_what_it_expected_and_names_the_file(tmp_path):
    cases = {"garbage.pem": b"this is not a key\n",
             "broken.pem": b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
             "list.json": b"[1, 2]"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        line = one_line_error(run_proxy([], dict(DEV, JWT_KEY_FILE=str(path)), tmp_path))
        assert f"JWT_KEY_FILE: {path}: neither a JWKS JSON document nor a PEM public key" in line, line
    private = tmp_path / "private.pem"
    private.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    line = one_line_error(run_proxy([], dict(DEV, JWT_KEY_FILE=str(private)), tmp_path))
    assert f"JWT_KEY_FILE: {private}: a PEM private key" in line


def test_an_rsa_key_with_the_default_eddsa_allowlist_stops_at_start(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "issuer.pem"
    path.write_bytes(pem(key.public_key()))
    line = one_line_error(run_proxy([], dict(DEV, JWT_KEY_FILE=str(path)), tmp_path))
    assert "JWT_ALG_ALLOWLIST" in line and "RSA" in line and str(path) in line
    assert "set JWT_ALG_ALLOWLIST=RS256" in line


async def test_which_algorithm_each_key_needs(io_loop, tmp_path):
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(pem(ec.generate_private_key(ec.SECP384R1()).public_key()))
    with pytest.raises(KeySetupError, match="set JWT_ALG_ALLOWLIST=ES384$") as caught:
        build_verifier(settings_for_tests(jwt_key_file=str(ec_path)), None)
    assert caught.value.option == "JWT_ALG_ALLOWLIST"
    ed_path = tmp_path / "jwks.json"
    ed_path.write_text(json.dumps(DevKey.generate("k1").jwks()))
    with pytest.raises(KeySetupError, match="set JWT_ALG_ALLOWLIST=EdDSA$"):
        build_verifier(settings_for_tests(jwt_key_file=str(ed_path), jwt_alg_allowlist=("RS256",)), None)
    # The allowlist the message names makes it work: the key verifies a token.
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_path = tmp_path / "rsa.pem"
    rsa_path.write_bytes(pem(rsa_key.public_key()))
    verifier = build_verifier(settings_for_tests(jwt_key_file=str(rsa_path), jwt_alg_allowlist=("RS256",)), None)
    token = jwt.encode({"sub": "alice", "exp": 2 ** 31}, rsa_key, algorithm="RS256")
    assert (await verifier.verify(token)).user_id == "alice"


class JwksHandler(tornado.web.RequestHandler):
    def initialize(self, document):
        self.document = document

    def get(self):
        self.write(self.document)


async def test_a_jwks_url_whose_keys_fit_no_allowed_algorithm_is_logged_at_first_fetch(io_loop, caplog):
    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    document = {"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public)), "kid": "r1"}]}
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(tornado.web.Application([(r"/jwks.json", JwksHandler, {"document": document})]))
    server.add_sockets(sockets)
    url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/jwks.json"
    http = AsyncHTTPClient(force_instance=True)
    try:
        verifier = build_verifier(settings_for_tests(jwt_jwks_url=url), http)
        assert verifier.keys.algorithms == ("EdDSA",)  # the default allowlist reaches the cache
        caplog.set_level(logging.WARNING, logger="comfy_ws_proxy.auth")
        await verifier.keys.refresh()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and url in warnings[0] and "JWT_ALG_ALLOWLIST=RS256" in warnings[0]
        await verifier.keys.refresh()  # said once, not at every fetch
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        caplog.clear()
        fitting = JwksCache(url, http, ttl=60, min_refetch_interval=0, algorithms=("RS256",))
        await fitting.refresh()
        assert fitting.keys and not [r for r in caplog.records if r.levelno == logging.WARNING]
    finally:
        http.close()
        server.stop()


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
