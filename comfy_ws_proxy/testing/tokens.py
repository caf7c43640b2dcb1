"""Development keys and tokens: an Ed25519 key pair, its JWKS, and signed JWTs.

Used by tests, scripts/dev_token.py, the quick start and the benchmarks. Not for production
key management: a real deployment verifies tokens from its identity provider's JWKS.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm


@dataclass
class DevKey:
    private_key: ed25519.Ed25519PrivateKey
    kid: str = "dev-1"

    @classmethod
    def generate(cls, kid: str = "dev-1") -> "DevKey":
        return cls(ed25519.Ed25519PrivateKey.generate(), kid)

    def public_jwk(self) -> dict:
        jwk = json.loads(OKPAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update({"kid": self.kid, "alg": "EdDSA", "use": "sig"})
        return jwk

    def jwks(self) -> dict:
        return {"keys": [self.public_jwk()]}

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    @classmethod
    def from_pem(cls, pem: bytes, kid: str = "dev-1") -> "DevKey":
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError("not an Ed25519 private key")
        return cls(key, kid)

    def token(self, sub: str = "alice", *, ttl: float = 3600, now: float | None = None, headers: dict | None = None,
              **claims) -> str:
        now = time.time() if now is None else now
        payload = {"sub": sub, "iat": int(now), "exp": int(now + ttl)}
        payload.update(claims)
        return jwt.encode(payload, self.private_key, algorithm="EdDSA", headers={"kid": self.kid, **(headers or {})})


def write_dev_keys(directory: str, kid: str = "dev-1") -> tuple[DevKey, str, str]:
    """Create (or reuse) dev keys in ``directory``: returns (key, private PEM path, public JWKS path)."""
    os.makedirs(directory, exist_ok=True)
    private_path = os.path.join(directory, "dev_private_key.pem")
    jwks_path = os.path.join(directory, "dev_jwks.json")
    if os.path.exists(private_path):
        with open(private_path, "rb") as f:
            key = DevKey.from_pem(f.read(), kid)
    else:
        key = DevKey.generate(kid)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_pem())
    with open(jwks_path, "w", encoding="utf-8") as f:
        json.dump(key.jwks(), f, indent=2)
    return key, private_path, jwks_path
