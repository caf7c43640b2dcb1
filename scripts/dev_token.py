#!/usr/bin/env python3
"""Mint a development JWT (EdDSA) for comfy_ws_proxy.

    python scripts/dev_token.py --sub alice            # prints a token valid for 1 hour

The first run creates a development key pair in ./dev/ (dev_private_key.pem, mode 0600)
and the matching public key file dev/dev_jwks.json; point the proxy at it with
JWT_KEY_FILE=dev/dev_jwks.json (conf/dev.py does). For development only.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from comfy_ws_proxy.testing.tokens import write_dev_keys  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sub", required=True, help="the user id (the token's sub claim)")
    parser.add_argument("--ttl", type=float, default=3600, help="seconds until the token expires")
    parser.add_argument("--dir", default="dev", help="where the development keys live (default ./dev)")
    parser.add_argument("--iss", help="issuer claim")
    parser.add_argument("--aud", help="audience claim")
    args = parser.parse_args()
    key, private_path, jwks_path = write_dev_keys(args.dir)
    claims = {k: v for k, v in (("iss", args.iss), ("aud", args.aud)) if v}
    print(key.token(args.sub, ttl=args.ttl, **claims))
    print(f"# signed with {private_path}; the proxy verifies with JWT_KEY_FILE={jwks_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
