"""A connection's token: one rule for the upgrade and the open connection (good until exp +
JWT_LEEWAY_S), a warning ahead of that deadline (token_expiring), and a fresh token handed
over in band (refresh_token). Times on an injected epoch clock: the pinger's tick is called
by hand after the clock is moved, nothing waits for real time."""
import asyncio
import json

import pytest

from comfy_ws_proxy.auth import AuthError, StaticKeys, TokenVerifier, check_times, parse_jwks, token_deadline
from comfy_ws_proxy.gateway.connection import token_times
from comfy_ws_proxy.gateway.protocol import CloseCode
from comfy_ws_proxy.testing.tokens import DevKey

from .helpers import TIMEOUT, FakeClock, ProxyHarness

LEEWAY = 30
START = 1_700_000_000.0


def harness(**overrides):
    wall = FakeClock(START)
    return ProxyHarness(wall=wall, jwt_leeway_s=LEEWAY, ws_ping_interval_s=0, **overrides), wall


async def still_open(client, ref="probe"):
    """The connection answers a ping (so nothing it was sent before that is missing)."""
    client.conn.write_message(json.dumps({"type": "ping", "ref": ref, "data": {}}))
    return await client.next("pong", lambda m: m.get("ref") == ref)


def kinds(client):
    return [m["type"] for m in client.json_messages()]


# --- the rule, at the upgrade and while connected ---------------------------------------------------

async def test_a_token_inside_the_leeway_is_accepted_and_lives_until_exp_plus_leeway(io_loop):
    h, wall = harness(token_expiry_warning_s=0)
    async with h:
        # exp passed 20 s ago, within the 30 s leeway: accepted, and not closed at once
        alice = await h.connect("alice", token=h.token("alice", now=wall.now - 80, ttl=60))
        h.state.pinger.tick()
        await still_open(alice, 1)
        wall.advance(9)  # exp + 29 s
        h.state.pinger.tick()
        await still_open(alice, 2)
        wall.advance(1)  # exp + 30 s: the deadline
        h.state.pinger.tick()
        code, _ = await asyncio.wait_for(alice.closed, TIMEOUT)
        assert code == CloseCode.TOKEN_EXPIRED
        error = [m for m in alice.json_messages() if m["type"] == "error"][-1]
        assert error["data"]["code"] == "unauthorized" and error["data"]["details"] == {"reason": "expired"}


async def test_the_upgrade_refuses_a_token_past_exp_plus_leeway(io_loop):
    h, wall = harness()
    async with h:
        status, body = await h.refused(h.token("alice", now=wall.now - 90, ttl=60))  # exp + 30 s
        assert status == 401 and body["error"]["reason"] == "expired"
        status, body = await h.refused(h.token("alice", now=wall.now - 89.5, ttl=60))
        # (exp is whole seconds: now - 89.5 + 60 rounds down to exp + 30 s as well)
        assert status == 401 and body["error"]["reason"] == "expired"
        alice = await h.connect("alice", token=h.token("alice", now=wall.now - 89, ttl=60))  # exp + 29 s
        await still_open(alice)


def test_check_times_is_the_same_rule_as_the_deadline():
    for exp in (0.0, 100.0, 100.5):
        deadline = token_deadline(exp, LEEWAY)
        check_times({"exp": exp}, deadline - 0.001, LEEWAY)
        with pytest.raises(AuthError) as info:
            check_times({"exp": exp}, deadline, LEEWAY)
        assert info.value.reason == "expired"
    check_times({"exp": 1000, "nbf": 530, "iat": 530}, 500, LEEWAY)
    for claim in ("nbf", "iat"):
        with pytest.raises(AuthError) as info:
            check_times({"exp": 1000, claim: 531}, 500, LEEWAY)
        assert info.value.reason == "not_yet_valid"
    for bad in ("100", True, [1], 10 ** 400):
        with pytest.raises(AuthError) as info:
            check_times({"exp": bad}, 0, LEEWAY)
        assert info.value.reason == "malformed"


async def test_the_verifier_reads_the_injected_clock(io_loop):
    key = DevKey.generate("k1")
    wall = FakeClock(START)
    verifier = TokenVerifier(StaticKeys(parse_jwks(key.jwks())), algorithms=("EdDSA",), leeway=5, wall=wall)
    token = key.token("alice", now=START, ttl=10)
    identity = await verifier.verify(token)
    assert identity.expires_at == START + 10 and verifier.deadline(identity) == START + 15
    wall.advance(15)
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    assert info.value.reason == "expired"
    future = key.token("alice", now=START + 100, ttl=10)  # iat and exp in the future
    with pytest.raises(AuthError) as info:
        await verifier.verify(future)
    assert info.value.reason == "not_yet_valid"


def test_token_times():
    # warned 60 s before the deadline...
    assert token_times(0, 1000, 60) == (940, 1000)
    # ...but not before half the time left has passed (a 30 s token is not refreshed in a loop)
    assert token_times(0, 60, 60) == (30, 60)
    assert token_times(0, 1000, 0) == (None, 1000)
    assert token_times(0, None, 60) == (None, None)


# --- the warning and the refresh ------------------------------------------------------------------

async def test_token_expiring_comes_ahead_of_the_deadline_and_a_refresh_moves_it(io_loop):
    h, wall = harness(token_expiry_warning_s=60)
    async with h:
        alice = await h.connect("alice", token=h.token("alice", now=wall.now, ttl=600))  # deadline: +630 s
        wall.advance(569)
        h.state.pinger.tick()
        await still_open(alice, 1)
        assert "token_expiring" not in kinds(alice)
        wall.advance(1)  # 60 s before the deadline
        h.state.pinger.tick()
        warning = await alice.next("token_expiring")
        assert warning["data"] == {"expires_at": START + 600, "deadline": START + 630, "seconds_left": 60}
        h.state.pinger.tick()
        await still_open(alice, 2)
        assert kinds(alice).count("token_expiring") == 1  # once per token
        fresh = h.token("alice", now=wall.now, ttl=600)
        alice.conn.write_message(json.dumps({"type": "refresh_token", "ref": "r", "data": {"token": fresh}}))
        refreshed = await alice.next("token_refreshed")
        assert refreshed["ref"] == "r"
        assert refreshed["data"] == {"expires_at": START + 570 + 600, "deadline": START + 570 + 630}
        wall.advance(100)  # past the old token's deadline
        h.state.pinger.tick()
        await still_open(alice, 3)
        wall.advance(470)  # the new token's warning
        h.state.pinger.tick()
        await alice.next("token_expiring")


async def test_a_refused_refresh_keeps_the_old_token(io_loop):
    h, wall = harness(token_expiry_warning_s=0)
    async with h:
        alice = await h.connect("alice", token=h.token("alice", now=wall.now, ttl=100))  # deadline: +130 s
        other_key = DevKey.generate(h.key.kid)
        refused = {
            "other_user": h.token("bob", now=wall.now, ttl=600),
            "expired": h.token("alice", now=wall.now - 700, ttl=600),
            "bad_signature": other_key.token("alice", now=wall.now, ttl=600),
            "malformed": "not-a-jwt",
        }
        for reason, token in refused.items():
            alice.conn.write_message(json.dumps({"type": "refresh_token", "ref": reason, "data": {"token": token}}))
            error = await alice.next("error", lambda m: m.get("ref") == reason)
            assert error["data"]["code"] == "unauthorized" and error["data"]["details"] == {"reason": reason}
        alice.conn.write_message(json.dumps({"type": "refresh_token", "ref": 9, "data": {}}))
        assert (await alice.next("error", lambda m: m.get("ref") == 9))["data"]["code"] == "invalid_message"
        assert h.state.registry.sessions["alice"].user_id == "alice"
        wall.advance(130)  # the old token's deadline still stands
        h.state.pinger.tick()
        code, _ = await asyncio.wait_for(alice.closed, TIMEOUT)
        assert code == CloseCode.TOKEN_EXPIRED


async def test_expiry_is_checked_without_pings(io_loop):
    """WS_PING_INTERVAL_S=0 turns pings off, not token expiry: the pinger's timer still runs."""
    h, wall = harness()
    async with h:
        assert h.state.pinger._timer.is_running()
        alice = await h.connect("alice", token=h.token("alice", now=wall.now, ttl=10))
        h.state.pinger.tick()
        assert alice.conn.close_code is None and (await still_open(alice))
        wall.advance(40)
        h.state.pinger.tick()
        code, _ = await asyncio.wait_for(alice.closed, TIMEOUT)
        assert code == CloseCode.TOKEN_EXPIRED
