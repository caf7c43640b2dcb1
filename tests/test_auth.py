"""JWT verification: a matrix of bad tokens, the JWKS cache (outage, random-kid flood)."""
import asyncio
import base64
import json
import time

import jwt
import pytest
import tornado.web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders
from tornado.netutil import bind_sockets

from comfy_ws_proxy.auth import AuthError, JwksCache, StaticKeys, TokenVerifier, extract_token, parse_jwks
from comfy_ws_proxy.testing.tokens import DevKey

from .helpers import FakeClock

ISS = "https://issuer.example/"
AUD = "comfy"
KEY = DevKey.generate("k1")
OTHER = DevKey.generate("k1")  # another issuer's key with the same kid


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, payload: dict, signature: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)])


def good(**claims):
    base = {"iss": ISS, "aud": AUD}
    base.update(claims)
    return KEY.token("alice", **base)


def tamper_payload(token: str) -> str:
    head, payload, sig = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["sub"] = "mallory"
    return ".".join([head, b64(json.dumps(data).encode()), sig])


def tamper_signature(token: str) -> str:
    head, payload, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[0] ^= 1
    return ".".join([head, payload, b64(bytes(raw))])


def hs256_with_public_key() -> str:
    public_pem = KEY.private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "kid": "k1", "typ": "JWT"}
    payload = {"sub": "alice", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 600}
    import hashlib
    import hmac
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    sig = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


def rsa_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode({"sub": "alice", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 600}, key,
                      algorithm="RS256", headers={"kid": "k1"})


def es256_token() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode({"sub": "alice", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 600}, key,
                      algorithm="ES256", headers={"kid": "k1"})


now = time.time()
BAD_TOKENS = {
    "expired": (lambda: good(ttl=-3600), "expired"),
    "not_yet_valid": (lambda: good(nbf=int(now) + 3600), "not_yet_valid"),
    "wrong_issuer": (lambda: KEY.token("alice", iss="https://evil.example/", aud=AUD), "bad_issuer"),
    "missing_issuer": (lambda: KEY.token("alice", aud=AUD), "bad_issuer"),
    "wrong_audience": (lambda: KEY.token("alice", iss=ISS, aud="other"), "bad_audience"),
    "missing_audience": (lambda: KEY.token("alice", iss=ISS), "missing_claim"),
    "alg_none": (lambda: forge({"alg": "none", "kid": "k1"}, {"sub": "alice", "iss": ISS, "aud": AUD,
                                                               "exp": int(now) + 600}), "alg_not_allowed"),
    "alg_None_case": (lambda: forge({"alg": "None", "kid": "k1"}, {"sub": "alice", "exp": int(now) + 600}),
                      "alg_not_allowed"),
    "hs256_with_public_key": (hs256_with_public_key, "alg_not_allowed"),
    "rs256_not_allowed": (rsa_token, "alg_not_allowed"),
    "es256_not_allowed": (es256_token, "alg_not_allowed"),
    "unknown_kid": (lambda: DevKey(KEY.private_key, "nope").token("alice", iss=ISS, aud=AUD), "unknown_kid"),
    "same_kid_other_issuer_key": (lambda: OTHER.token("alice", iss=ISS, aud=AUD), "bad_signature"),
    "tampered_payload": (lambda: tamper_payload(good()), "bad_signature"),
    "tampered_signature": (lambda: tamper_signature(good()), "bad_signature"),
    "missing_exp": (lambda: jwt.encode({"sub": "alice", "iss": ISS, "aud": AUD}, KEY.private_key,
                                       algorithm="EdDSA", headers={"kid": "k1"}), "missing_claim"),
    "missing_sub": (lambda: jwt.encode({"iss": ISS, "aud": AUD, "exp": int(now) + 600}, KEY.private_key,
                                       algorithm="EdDSA", headers={"kid": "k1"}), "missing_claim"),
    "empty_sub": (lambda: KEY.token("", iss=ISS, aud=AUD), "missing_claim"),
    "numeric_sub": (lambda: jwt.encode({"sub": 42, "iss": ISS, "aud": AUD, "exp": int(now) + 600},
                                       KEY.private_key, algorithm="EdDSA", headers={"kid": "k1"}), None),
    "jku_injection": (lambda: OTHER.token("alice", iss=ISS, aud=AUD,
                                          headers={"jku": "http://127.0.0.1:9/jwks.json"}), "bad_signature"),
    "jwk_injection": (lambda: DevKey(OTHER.private_key, "attacker").token(
        "alice", iss=ISS, aud=AUD, headers={"jwk": OTHER.public_jwk()}), "unknown_kid"),
    "x5u_injection": (lambda: DevKey(OTHER.private_key, "x").token(
        "alice", iss=ISS, aud=AUD, headers={"x5u": "http://127.0.0.1:9/cert"}), "unknown_kid"),
    "garbage": (lambda: "not-a-jwt", "malformed"),
    "three_garbage_parts": (lambda: "a.b.c", "malformed"),
    "empty": (lambda: "", "missing_token"),
    "huge": (lambda: "a" * 10000, "malformed"),
    "kid_not_string": (lambda: forge({"alg": "EdDSA", "kid": 5}, {"sub": "alice", "exp": int(now) + 600},
                                     b"x" * 64), "malformed"),
}


def verifier(**kw):
    return TokenVerifier(StaticKeys(parse_jwks(KEY.jwks())), algorithms=("EdDSA",), issuers=(ISS,),
                         audiences=(AUD,), leeway=5, **kw)


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
async def test_bad_token_is_refused(io_loop, name):
    make, reason = BAD_TOKENS[name]
    with pytest.raises(AuthError) as info:
        await verifier().verify(make())
    if reason is not None:
        assert info.value.reason == reason, info.value.reason
    assert "alice" not in info.value.message  # the message never echoes token content


async def test_good_tokens_are_accepted(io_loop):
    identity = await verifier().verify(good())
    assert identity.user_id == "alice" and identity.verified and identity.issuer == ISS
    # within the leeway
    identity = await verifier().verify(good(nbf=int(time.time()) + 2))
    assert identity.user_id == "alice"


async def test_no_verify_takes_sub_unverified(io_loop):
    v = TokenVerifier(None, algorithms=("EdDSA",), no_verify=True)
    identity = await v.verify(OTHER.token("bob"))
    assert identity.user_id == "bob" and not identity.verified


def test_extract_token_sources():
    h = HTTPHeaders({"Authorization": "Bearer abc"})
    assert extract_token(h, "", allow_query=False) == ("abc", "header")
    h = HTTPHeaders({"Sec-WebSocket-Protocol": "comfy-ws-proxy.v1, bearer.xyz"})
    assert extract_token(h, "", allow_query=False) == ("xyz", "subprotocol")
    assert extract_token(HTTPHeaders(), "token=q", allow_query=False) == (None, "none")
    assert extract_token(HTTPHeaders(), "token=q", allow_query=True) == ("q", "query")


class JwksHandler(tornado.web.RequestHandler):
    def initialize(self, state):
        self.state = state

    def get(self):
        self.state["hits"] += 1
        mode = self.state["mode"]
        if mode == "down":
            self.set_status(503)
            return self.finish("down")
        if mode == "garbage":
            return self.finish("{not json")
        self.finish(json.dumps(self.state["jwks"]))


async def serve_jwks(state):
    app = tornado.web.Application([(r"/jwks.json", JwksHandler, {"state": state})])
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets(sockets)
    return server, f"http://127.0.0.1:{sockets[0].getsockname()[1]}/jwks.json"


async def test_jwks_outage_keeps_last_good_keys(io_loop):
    state = {"hits": 0, "mode": "ok", "jwks": KEY.jwks()}
    server, url = await serve_jwks(state)
    http = AsyncHTTPClient(force_instance=True)
    clock = FakeClock()
    cache = JwksCache(url, http, ttl=60, min_refetch_interval=10, clock=clock)
    v = TokenVerifier(cache, algorithms=("EdDSA",))
    try:
        assert (await v.verify(KEY.token("alice"))).user_id == "alice"
        assert state["hits"] == 1
        verified_during_outage = 0
        for mode in ("down", "garbage"):
            state["mode"] = mode
            clock.advance(61)  # keys are stale: each lookup may refetch, and it fails
            for _ in range(5):
                assert (await v.verify(KEY.token("alice"))).user_id == "alice"
                verified_during_outage += 1
        assert cache.stats.failures == 2 and state["hits"] == 3
        assert verified_during_outage == 10
        print(f"JWKS outage: {verified_during_outage} tokens verified with the last good keys, "
              f"{cache.stats.failures} failed fetches")
    finally:
        http.close()
        server.stop()


async def test_random_kid_flood_costs_one_fetch_per_interval(io_loop):
    state = {"hits": 0, "mode": "ok", "jwks": KEY.jwks()}
    server, url = await serve_jwks(state)
    http = AsyncHTTPClient(force_instance=True)
    clock = FakeClock()
    cache = JwksCache(url, http, ttl=300, min_refetch_interval=30, clock=clock)
    v = TokenVerifier(cache, algorithms=("EdDSA",))
    try:
        await v.verify(KEY.token("alice"))
        flood = [DevKey(OTHER.private_key, f"random-{i}").token("mallory") for i in range(1000)]
        results = await asyncio.gather(*(v.verify(t) for t in flood), return_exceptions=True)
        assert all(isinstance(r, AuthError) and r.reason == "unknown_kid" for r in results)
        assert state["hits"] == 1  # the flood inside one interval fetched nothing more
        clock.advance(31)
        results = await asyncio.gather(*(v.verify(t) for t in flood[:200]), return_exceptions=True)
        assert state["hits"] == 2  # one fetch for the next interval, shared by concurrent lookups
        assert (await v.verify(KEY.token("alice"))).user_id == "alice"
        print(f"random-kid flood: 1,200 unknown kids over 2 intervals cost {state['hits'] - 1} fetches")
    finally:
        http.close()
        server.stop()


async def test_jwks_rotation_picks_up_a_new_kid(io_loop):
    new_key = DevKey.generate("k2")
    state = {"hits": 0, "mode": "ok", "jwks": KEY.jwks()}
    server, url = await serve_jwks(state)
    http = AsyncHTTPClient(force_instance=True)
    clock = FakeClock()
    cache = JwksCache(url, http, ttl=300, min_refetch_interval=30, clock=clock)
    v = TokenVerifier(cache, algorithms=("EdDSA",))
    try:
        await v.verify(KEY.token("alice"))
        state["jwks"] = {"keys": KEY.jwks()["keys"] + new_key.jwks()["keys"]}
        clock.advance(31)
        assert (await v.verify(new_key.token("bob"))).user_id == "bob"
    finally:
        http.close()
        server.stop()


def test_parse_jwks_refuses_symmetric_and_empty():
    with pytest.raises(ValueError):
        parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]})
    with pytest.raises(ValueError):
        parse_jwks({"nothing": 1})
