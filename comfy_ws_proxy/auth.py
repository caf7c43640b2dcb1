"""Token extraction and JWT verification, with an asynchronous JWKS cache.

Keys only ever come from configuration (JWT_JWKS_URL or JWT_KEY_FILE): headers such as
``jku``, ``x5u`` and ``jwk`` are ignored. The JWKS is fetched with AsyncHTTPClient, never a
blocking call on the IOLoop (PyJWKClient blocks, so it is not used).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

log = logging.getLogger(__name__)

BEARER_PREFIX = "bearer."  # the browser subprotocol form of a token: "bearer.<jwt>"

MAX_TOKEN_LENGTH = 8192
MAX_SUB_LENGTH = 256
MAX_EXP = 2 ** 53  # seconds: beyond this a number stops being exact (and 10**400 overflows a float)


class AuthError(Exception):
    """Why a token was refused. ``reason`` is a stable label (metrics, logs); never the token."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Identity:
    user_id: str
    expires_at: float | None  # epoch seconds, from exp
    issuer: str | None
    verified: bool


class KeySetupError(Exception):
    """Configured keys that cannot work: an unreadable or unrecognised key file, or keys that
    verify none of the allowed algorithms. ``option`` names the setting to fix; ``str()`` is
    one line for the operator."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


# --- extraction ------------------------------------------------------------------------------

def extract_token(headers, query: str, *, allow_query: bool) -> tuple[str | None, str]:
    """Return (token, source) from Authorization, the subprotocol pair, or ?token= (opt-in)."""
    authorization = headers.get("Authorization", "")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip(), "header"
    for item in requested_subprotocols(headers):
        if item.startswith(BEARER_PREFIX) and len(item) > len(BEARER_PREFIX):
            return item[len(BEARER_PREFIX):], "subprotocol"
    if allow_query and query:
        values = parse_qs(query).get("token")
        if values and values[0]:
            return values[0], "query"
    return None, "none"


def requested_subprotocols(headers) -> list[str]:
    raw = ",".join(headers.get_list("Sec-WebSocket-Protocol")) if hasattr(headers, "get_list") \
        else headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


# --- keys ------------------------------------------------------------------------------------

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}
PUBLIC_KEY_TYPES = (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey, rsa.RSAPublicKey, ec.EllipticCurvePublicKey)


@dataclass(frozen=True)
class VerificationKey:
    kid: str | None
    key: Any  # a cryptography public key object
    alg: str | None  # the JWK's own "alg", if it named one

    def accepts(self, alg: str) -> bool:
        """Is ``alg`` a sound choice for this key type? Never HMAC with a public key."""
        if self.alg is not None and self.alg != alg:
            return False
        if isinstance(self.key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            return alg in ("EdDSA", "Ed25519", "Ed448")
        if isinstance(self.key, rsa.RSAPublicKey):
            return alg[:2] in ("RS", "PS")
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            return _EC_ALGORITHMS.get(self.key.curve.name) == alg
        return False

    def needed_alg(self) -> str | None:
        """The algorithm to allow for this key (for RSA the usual one: any RS/PS would do)."""
        if self.alg is not None:
            return self.alg
        if isinstance(self.key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            return "EdDSA"
        if isinstance(self.key, rsa.RSAPublicKey):
            return "RS256"
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            return _EC_ALGORITHMS.get(self.key.curve.name)
        return None

    @property
    def kind(self) -> str:
        if isinstance(self.key, ec.EllipticCurvePublicKey):
            return f"EC {self.key.curve.name}"
        for name, types in (("Ed25519", ed25519.Ed25519PublicKey), ("Ed448", ed448.Ed448PublicKey),
                            ("RSA", rsa.RSAPublicKey)):
            if isinstance(self.key, types):
                return name
        return type(self.key).__name__


def algorithm_mismatch(keys, algorithms: tuple[str, ...], source: str) -> str | None:
    """None if some key can verify some allowed algorithm; else one line saying what to allow.

    Without this, an RSA key with the default EdDSA allowlist starts fine and then refuses
    every token (alg_not_allowed)."""
    keys = list(keys)
    if any(key.accepts(alg) for key in keys for alg in algorithms):
        return None
    kinds = ", ".join(sorted({key.kind for key in keys}))
    needed = sorted({alg for alg in (key.needed_alg() for key in keys) if alg})
    line = f"{', '.join(algorithms)} cannot be verified with the {kinds} key{'s' if len(keys) > 1 else ''} " \
           f"in {source}"
    if not needed:
        return line
    line += f"; set JWT_ALG_ALLOWLIST={','.join(needed)}"
    if any(isinstance(key.key, rsa.RSAPublicKey) and key.alg is None for key in keys):
        line += " (or the RS/PS algorithm your issuer signs with)"
    return line


def parse_jwks(document: Any) -> dict[str | None, VerificationKey]:
    """Keys of a JWKS document (or of a single JWK) by kid. Private or symmetric keys are refused."""
    if isinstance(document, dict) and "keys" in document:
        entries = document["keys"]
    elif isinstance(document, dict) and "kty" in document:
        entries = [document]
    else:
        raise ValueError("not a JWKS document")
    if not isinstance(entries, list):
        raise ValueError("JWKS 'keys' is not a list")
    keys: dict[str | None, VerificationKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") == "oct":
            continue  # symmetric keys never verify tokens here
        if entry.get("use") not in (None, "sig"):
            continue
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            log.warning("skipping a JWKS key that cannot be loaded (kid=%s)", entry.get("kid"))
            continue
        if hasattr(key, "private_bytes"):
            key = key.public_key()  # a private JWK in a key file: use its public half only
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        keys[kid] = VerificationKey(kid, key, entry.get("alg") if isinstance(entry.get("alg"), str) else None)
    if not keys:
        raise ValueError("JWKS holds no usable public signing key")
    return keys


def load_key_file(path: str) -> dict[str | None, VerificationKey]:
    """A local JWKS (JSON) or PEM public key file; read once at start-up. Raises
    KeySetupError with one line naming the file."""
    def bad(why: str) -> KeySetupError:
        return KeySetupError("JWT_KEY_FILE", f"{path}: {why}")

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise bad(f"cannot read: {e.strerror}") from None
    neither = "neither a JWKS JSON document nor a PEM public key"
    if raw.lstrip().startswith(b"-----BEGIN"):
        first_line = raw.lstrip().split(b"\n", 1)[0]
        if b"PRIVATE KEY" in first_line:
            raise bad("a PEM private key; give the proxy the public key only (openssl pkey -pubout)")
        if b"CERTIFICATE" in first_line:
            raise bad("a certificate, not a public key; extract it with openssl x509 -pubkey -noout")
        try:
            key = load_pem_public_key(raw)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise bad(f"{neither} (its PEM block holds no readable public key)") from None
        if not isinstance(key, PUBLIC_KEY_TYPES):
            raise bad(f"a {type(key).__name__}, which cannot verify JWTs (RSA, EC or Ed25519 keys can)")
        return {None: VerificationKey(None, key, None)}
    try:
        document = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        raise bad(neither) from None
    if not (isinstance(document, dict) and ("keys" in document or "kty" in document)):
        raise bad(f'{neither} (JSON, but with no "keys" or "kty")')
    try:
        return parse_jwks(document)
    except ValueError as e:  # a JWKS, but no key in it can verify a token
        raise bad(str(e)) from None


class KeyProvider:
    """Where verification keys come from. ``find`` may fetch; it never blocks the loop."""

    async def find(self, kid: str | None) -> VerificationKey | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StaticKeys(KeyProvider):
    def __init__(self, keys: dict[str | None, VerificationKey]):
        self.keys = keys

    async def find(self, kid):
        if kid in self.keys:
            return self.keys[kid]
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        if None in self.keys and len(self.keys) == 1:
            return self.keys[None]  # a PEM key has no kid: it is the only key
        return None


@dataclass
class JwksStats:
    fetches: int = 0
    failures: int = 0
    outcomes: list = field(default_factory=list)


class JwksCache(KeyProvider):
    """Keys from a JWKS URL, cached by kid.

    - Fresh for ``ttl`` seconds; after that the next lookup refetches.
    - An unknown kid triggers at most one fetch per ``min_refetch_interval`` seconds:
      a flood of random kids costs one fetch per interval, not one per token.
    - A failed fetch (endpoint down, garbage) keeps the last good keys working.
    - Concurrent lookups share one in-flight fetch.
    """

    def __init__(self, url: str, http_client: AsyncHTTPClient, *, ttl: float, min_refetch_interval: float,
                 timeout: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 on_fetch: Callable[[str], None] | None = None, algorithms: tuple[str, ...] = ()):
        self.url = url
        self.algorithms = tuple(algorithms)  # to warn when no fetched key can verify any of them
        self._mismatch_told = False
        self.http = http_client
        self.ttl = ttl
        self.min_refetch_interval = min_refetch_interval
        self.timeout = timeout
        self.clock = clock
        self.on_fetch = on_fetch
        self.keys: dict[str | None, VerificationKey] = {}
        self.fetched_at: float | None = None  # last successful fetch
        self.attempted_at: float | None = None  # last attempt, successful or not
        self._inflight: asyncio.Future | None = None
        self.stats = JwksStats()

    async def find(self, kid):
        now = self.clock()
        stale = self.fetched_at is None or now - self.fetched_at >= self.ttl
        if kid in self.keys and not stale:
            return self.keys[kid]
        if self._may_fetch(now):
            await self.refresh()
        return self.keys.get(kid)

    def _may_fetch(self, now: float) -> bool:
        if self._inflight is not None:
            return True  # join the fetch already running
        return self.attempted_at is None or now - self.attempted_at >= self.min_refetch_interval

    async def refresh(self) -> None:
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._clear_inflight)
        await asyncio.shield(self._inflight)

    def _clear_inflight(self, _future) -> None:
        self._inflight = None

    async def _fetch(self) -> None:
        self.attempted_at = self.clock()
        self.stats.fetches += 1
        try:
            response = await self.http.fetch(HTTPRequest(self.url, request_timeout=self.timeout,
                                                          connect_timeout=self.timeout, follow_redirects=False,
                                                          headers={"Accept": "application/json"}),
                                              raise_error=True)
            keys = parse_jwks(json.loads(response.body))
        except Exception as e:  # any failure: keep the last good keys
            self.stats.failures += 1
            self._note("error")
            log.warning("JWKS fetch from %s failed (%s: %s); keeping %d cached keys",
                        self.url, type(e).__name__, str(e)[:200], len(self.keys))
            return
        self.keys = keys
        self.fetched_at = self.clock()
        self._note("ok")
        log.info("JWKS fetched from %s: %d keys", self.url, len(keys))
        self._check_algorithms()

    def _check_algorithms(self) -> None:
        """Warn once (until it is fixed) when no fetched key can verify an allowed algorithm:
        the keys are not known at start, so this is the earliest the mistake shows."""
        mismatch = algorithm_mismatch(self.keys.values(), self.algorithms, self.url) if self.algorithms else None
        if mismatch is not None and not self._mismatch_told:
            log.warning("JWT_ALG_ALLOWLIST: %s; until then every token is refused", mismatch)
        self._mismatch_told = mismatch is not None

    def _note(self, outcome: str) -> None:
        self.stats.outcomes.append(outcome)
        del self.stats.outcomes[:-100]
        if self.on_fetch is not None:
            self.on_fetch(outcome)


# --- verification ----------------------------------------------------------------------------

def token_deadline(expires_at: float | None, leeway: float) -> float | None:
    """When a token stops being good (epoch seconds): ``leeway`` seconds after its exp. The
    one rule for the upgrade (verify) and the open connection (closed with 4001 then), so
    that a token accepted at the upgrade is never closed at once."""
    return None if expires_at is None else expires_at + leeway


def check_times(claims: dict, now: float, leeway: float) -> None:
    """``exp``, ``nbf`` and ``iat`` against ``now`` (epoch seconds), each with ``leeway`` of
    clock skew: good from nbf (and iat) - leeway until token_deadline(exp). Raises AuthError."""
    deadline = token_deadline(_claim_time(claims, "exp"), leeway)
    if deadline is not None and now >= deadline:
        raise AuthError("expired", "Token has expired")
    for name in ("nbf", "iat"):
        start = _claim_time(claims, name)
        if start is not None and now + leeway < start:
            raise AuthError("not_yet_valid", "Token is not valid yet")


class TokenVerifier:
    """Checks tokens against the configured keys and claims; times on the injected epoch
    clock ``wall`` (PyJWT's own time checks read the system clock, so they are not used)."""

    def __init__(self, keys: KeyProvider | None, *, algorithms: tuple[str, ...], issuers: tuple[str, ...] = (),
                 audiences: tuple[str, ...] = (), leeway: float = 30, no_verify: bool = False,
                 wall: Callable[[], float] = time.time):
        self.keys = keys
        self.algorithms = tuple(a for a in algorithms if a.lower() != "none" and not a.upper().startswith("HS"))
        self.issuers = tuple(issuers)
        self.audiences = tuple(audiences)
        self.leeway = leeway
        self.no_verify = no_verify
        self.wall = wall

    def deadline(self, identity: "Identity") -> float | None:
        """When the connection that presented ``identity``'s token must close (epoch seconds)."""
        return token_deadline(identity.expires_at, self.leeway)

    async def fetch_key(self, token: str | None) -> None:
        """Have the token's signing key at hand (a JWKS fetch for an unknown kid may take its
        time). Run before a caller takes an upgrade slot, so that waiting on the JWKS endpoint
        holds no slot; verify() then finds the key cached (or quickly finds it missing). Any
        problem with the token is left to verify() to report."""
        if not token or self.no_verify or self.keys is None or len(token) > MAX_TOKEN_LENGTH:
            return
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return
        if kid is None or isinstance(kid, str):
            await self.keys.find(kid)

    async def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("missing_token", "A bearer token is required")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("malformed", "Token too long")
        if self.no_verify:
            return self._unverified(token)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed", "Token is not a well-formed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError("alg_not_allowed", "Token algorithm is not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed", "Token kid must be a string")
        key = await self.keys.find(kid) if self.keys is not None else None
        if key is None:
            raise AuthError("unknown_kid", "Token signing key is unknown")
        if not key.accepts(alg):
            raise AuthError("alg_not_allowed", "Token algorithm does not match its key")
        options = {"require": ["exp", "sub"], "verify_aud": bool(self.audiences), "verify_iss": False,
                   "verify_exp": False, "verify_nbf": False, "verify_iat": False}  # check_times does those
        try:
            claims = jwt.decode(token, key=key.key, algorithms=[alg], options=options,
                                audience=list(self.audiences) or None)
        except jwt.InvalidAudienceError:
            raise AuthError("bad_audience", "Token audience is not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError("missing_claim", f"Token lacks the '{e.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "Token signature is invalid") from None
        except jwt.PyJWTError:
            raise AuthError("invalid", "Token is invalid") from None
        except (ValueError, TypeError, OverflowError):  # a claim PyJWT could not compare
            raise AuthError("malformed", "Token claims are malformed") from None
        check_times(claims, self.wall(), self.leeway)
        issuer = claims.get("iss")
        if self.issuers and issuer not in self.issuers:
            raise AuthError("bad_issuer", "Token issuer is not accepted")
        return Identity(self._user_id(claims), _claim_time(claims, "exp"), issuer if isinstance(issuer, str) else None,
                        True)

    def _unverified(self, token: str) -> Identity:
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthError("malformed", "Token is not a well-formed JWT") from None
        if not isinstance(claims, dict):
            raise AuthError("malformed", "Token claims are malformed")
        check_times(claims, self.wall(), self.leeway)  # as verified tokens: or the connection closes at once
        return Identity(self._user_id(claims), _claim_time(claims, "exp"), None, False)

    @staticmethod
    def _user_id(claims: dict) -> str:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH:
            raise AuthError("missing_claim", "Token 'sub' must be a non-empty string")
        if any(ord(c) < 32 or ord(c) == 127 for c in sub):  # a newline would forge log lines
            raise AuthError("malformed", "Token 'sub' must not contain control characters")
        return sub


def _claim_time(claims: dict, name: str) -> float | None:
    """``exp``, ``nbf`` or ``iat`` as epoch seconds. PyJWT would convert a string with int();
    we take only a number, in a sane range."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_EXP < value < MAX_EXP:
        raise AuthError("malformed", f"Token '{name}' must be a number of seconds")
    return float(value)


def build_verifier(settings, http_client: AsyncHTTPClient, on_jwks_fetch=None,
                   wall: Callable[[], float] = time.time) -> TokenVerifier:
    """The verifier the settings ask for (local key file, JWKS URL, or NO_VERIFY). Raises
    KeySetupError when the key file is unusable or none of its keys fits the allowlist."""
    keys: KeyProvider | None = None
    verifier = TokenVerifier(None, algorithms=settings.jwt_alg_allowlist, issuers=settings.jwt_issuers,
                             audiences=settings.jwt_audiences, leeway=settings.jwt_leeway_s,
                             no_verify=settings.no_verify, wall=wall)
    if settings.jwt_key_file:
        loaded = load_key_file(settings.jwt_key_file)
        mismatch = algorithm_mismatch(loaded.values(), verifier.algorithms, settings.jwt_key_file)
        if mismatch is not None and not settings.no_verify:
            raise KeySetupError("JWT_ALG_ALLOWLIST", mismatch)
        keys = StaticKeys(loaded)
    elif settings.jwt_jwks_url:
        keys = JwksCache(settings.jwt_jwks_url, http_client, ttl=settings.jwks_cache_ttl_s,
                         min_refetch_interval=settings.jwks_min_refetch_interval_s, on_fetch=on_jwks_fetch,
                         algorithms=verifier.algorithms)
    verifier.keys = keys
    return verifier
