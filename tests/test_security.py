"""Security: limits (each a named option with a test), token expiry, per-IP caps, slow
consumers, cross-user isolation at scale, and a fuzz test of the client socket."""
import asyncio
import base64
import json
import os
import socket
import struct
import uuid
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfy_ws_proxy.gateway.protocol import CloseCode
from comfy_ws_proxy.model import Job

from .helpers import TIMEOUT, ProxyHarness, workflow


def variant(name: str, n: int) -> dict:
    prompt = workflow(name)
    prompt["1"]["inputs"]["color"] = n  # a different prompt each time: ComfyUI would cache a repeat
    return prompt


async def test_submit_rate_limit_with_retry_after(io_loop):
    async with ProxyHarness(submit_rate_per_s=0.01, submit_burst=2) as h:
        h.sim.paused = True
        alice = await h.connect("alice")
        for i in range(2):
            assert (await alice.submit(variant("success", i)))["type"] == "prompt_accepted"
        limited = await alice.submit(variant("success", 3))
        assert limited["data"]["code"] == "rate_limited" and limited["data"]["details"]["retry_after"] > 0
        bob = await h.connect("bob")  # per user: Bob is not limited by Alice's rate
        assert (await bob.submit(variant("success", 4)))["type"] == "prompt_accepted"
        h.sim.paused = False


async def test_prompt_size_and_node_allowlist(io_loop):
    async with ProxyHarness(max_prompt_nodes=3, node_allowlist=["EmptyImage", "ImageInvert", "SaveImage"]) as h:
        alice = await h.connect("alice")
        big = await alice.submit(workflow("success"))
        assert big["data"]["code"] == "invalid_prompt" and big["data"]["details"]["limit"] == 3
        small = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        refused = await alice.submit(small)
        assert refused["data"]["code"] == "invalid_prompt" and "PreviewImage" in refused["data"]["message"]
        assert h.sim.requests == [] or all(path != "/prompt" for _, path in h.sim.requests)


async def test_connection_cap_per_ip(io_loop):
    async with ProxyHarness(max_connections_per_ip=2, max_connections_per_user=5) as h:
        await h.connect("a")
        await h.connect("b")
        status, body = await h.refused(h.token("c"))
        assert status == 429 and body["error"]["code"] == "too_many_connections"


async def test_forwarded_address_is_used_only_when_trusted(io_loop):
    for trusted, expected in ((False, "127.0.0.1"), (True, "203.0.113.9")):
        async with ProxyHarness(trust_forwarded=trusted) as h:
            await h.connect("alice", headers={"X-Real-IP": "203.0.113.9"})
            assert list(h.state.registry.ip_connections) == [expected]


async def test_expired_token_closes_the_connection_with_4001(io_loop):
    async with ProxyHarness(jwt_leeway_s=0) as h:
        alice = await h.connect("alice", token=h.token("alice", ttl=1.5))
        code, _ = await asyncio.wait_for(alice.closed, TIMEOUT)  # the expiry timer is what is tested
        assert code == CloseCode.TOKEN_EXPIRED
        assert any(m["type"] == "error" and m["data"]["message"] == "Token expired" for m in alice.json_messages())


async def test_no_verify_and_default_secret_need_dev_mode():
    from comfy_ws_proxy.config import ConfigError, load_settings
    for env in ({"NO_VERIFY": "true", "METRICS_SECRET": "long-enough-secret"},
                {"JWT_KEY_FILE": "k.json"}):
        try:
            load_settings([], dict(env, COMFY_URL="http://127.0.0.1:1"))
        except ConfigError:
            continue
        raise AssertionError(f"{env} was accepted without DEV_MODE")


async def raw_upgrade(port: int, token: str, rcvbuf: int = 4096):
    """A WebSocket client that completes the upgrade and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def read_text_frame(reader) -> bytes:
    """One unmasked server text frame's payload."""
    head = await reader.readexactly(2)
    assert head[0] == 0x81
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack(">H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", await reader.readexactly(8))[0]
    return await reader.readexactly(n)


async def read_close_code(reader) -> int:
    """Read server frames until its close frame; return the close code."""
    data = b""

    async def read():
        nonlocal data
        while True:
            i = data.find(b"\x88")
            if i >= 0 and len(data) >= i + 4:
                return struct.unpack(">H", data[i + 2:i + 4])[0]
            chunk = await reader.read(65536)
            if not chunk:
                raise AssertionError("closed without a close frame")
            data += chunk
    return await asyncio.wait_for(read(), TIMEOUT)


def masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_client_that_stops_reading_is_closed_and_others_are_unaffected(io_loop):
    async with ProxyHarness(max_connections_per_user=2, max_outbound_buffer_bytes=256 * 1024) as h:
        alice = await h.connect("alice")
        bob = await h.connect("bob")
        _, writer = await raw_upgrade(h.port, h.token("alice"))
        for i in range(3):  # each run sends one 8 MB preview to both of Alice's connections
            _, outcome = await alice.run(variant("success-ws-large", i))
            assert outcome == "execution_success"
        assert h.state.metrics.slow_consumers._value.get() == 1
        assert len(h.state.registry.sessions["alice"].connections) == 1  # the stalled one is gone
        assert len([f for f in alice.binary_frames() if len(f) > 8_000_000]) == 3
        _, outcome = await bob.run(variant("success", 99))
        assert outcome == "execution_success"
        writer.close()


async def test_invalid_utf8_and_oversized_frames_close_with_documented_codes(io_loop):
    async with ProxyHarness(max_message_bytes=1024) as h:
        alice = await h.connect("alice", token=h.token("alice"))
        reader, writer = await raw_upgrade(h.port, h.token("mallory"), rcvbuf=65536)
        writer.write(masked_frame(0x1, b'{"type": "ping", "data": "\xff\xfe"}'))
        await writer.drain()
        # Tornado drops a connection that sends text that is not UTF-8 (no close frame): not legal.
        rest = await asyncio.wait_for(reader.read(), TIMEOUT)
        assert b"\x88" not in rest and reader.at_eof()
        writer.close()
        reader, writer = await raw_upgrade(h.port, h.token("mallory"), rcvbuf=65536)
        writer.write(masked_frame(0x1, b"x" * 5000))  # over 4 x max_message_bytes
        await writer.drain()
        assert await read_close_code(reader) == 1009  # message too big
        writer.close()
        _, outcome = await alice.run(workflow("success"))  # other users keep working
        assert outcome == "execution_success"


@pytest.mark.timeout(seconds=240)
async def test_one_hundred_users_see_zero_cross_user_frames(io_loop):
    async with ProxyHarness(comfy_request_timeout_ms=20000) as h:
        users = [await h.connect(f"user{i}") for i in range(100)]
        own: dict[str, set] = {}

        async def work(i, client):
            a, _ = await client.run(variant("success", 1000 + i), timeout=200)     # a broadcast TEXT frame
            b, _ = await client.run(variant("success-ws", 2000 + i), timeout=200)  # three previews
            own[client.user] = {a, b}

        await asyncio.wait_for(asyncio.gather(*(work(i, c) for i, c in enumerate(users))), 220)
        cross = 0
        for client in users:
            for m in client.json_messages():
                pid = m["data"].get("prompt_id") if isinstance(m["data"], dict) else None
                if pid is not None and pid not in own[client.user]:
                    cross += 1
            for frame in client.binary_frames():
                if frame[:4] == b"\x00\x00\x00\x04":
                    (n,) = struct.unpack(">I", frame[4:8])
                    if json.loads(frame[8:8 + n])["prompt_id"] not in own[client.user]:
                        cross += 1
            kinds = [struct.unpack(">I", f[:4])[0] for f in client.binary_frames()]
            assert kinds.count(3) == 1, (client.user, kinds)  # only its own text frame
            assert kinds.count(4) + kinds.count(1) == 3
        print(f"isolation: 100 users, 200 prompts, cross-user frames: {cross}")
        assert cross == 0


FUZZ = st.one_of(
    st.binary(max_size=300).map(lambda b: ("binary", b)),
    st.text(max_size=300).map(lambda t: ("text", t)),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                 lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                   max_size=4),
                 max_leaves=20).map(lambda v: ("json", v)),
    st.fixed_dictionaries({"type": st.sampled_from(["submit_prompt", "cancel", "resume", "ping", "nope"]),
                           "data": st.one_of(st.none(), st.integers(), st.text(max_size=10),
                                             st.dictionaries(st.sampled_from(
                                                 ["prompt", "prompt_id", "session_id", "last_seq", "extra_data",
                                                  "front", "partial_execution_targets"]),
                                                 st.one_of(st.integers(min_value=-2**70, max_value=2**70),
                                                           st.text(max_size=40), st.none(), st.booleans(),
                                                           st.lists(st.integers(), max_size=3),
                                                           st.dictionaries(st.text(max_size=3), st.integers(),
                                                                           max_size=3)),
                                                 max_size=4))}).map(lambda v: ("json", v)),
    st.integers(min_value=1, max_value=2000).map(lambda d: ("text", "[" * d + "]" * d)),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FUZZ, min_size=30, max_size=30))
def test_fuzzed_client_frames_never_cost_the_process_or_other_prompts(frames):
    asyncio.run(_fuzz(frames))


async def _fuzz(frames):
    async with ProxyHarness(max_message_bytes=64 * 1024) as h:
        victim = await h.connect("mallory")
        bystander = await h.connect("alice")
        h.sim.paused = True
        pending = (await bystander.submit(variant("success", 5)))["data"]["prompt_id"]
        for kind, value in frames:
            if kind == "json":
                victim.send_raw(json.dumps(value))
            elif kind == "binary":
                victim.send_raw(value, binary=True)
            else:
                victim.send_raw(value)
            reply = await victim.next(where=lambda m: m.get("type") in ("error", "pong", "prompt_accepted",
                                                                         "prompt_cancelled", "prompts_state",
                                                                         "resume_gap"))
            if reply["type"] == "error":
                assert reply["data"]["code"] in ("invalid_message", "invalid_prompt", "message_too_large",
                                                 "not_found", "rate_limited", "queue_full"), reply
                assert isinstance(reply["data"]["message"], str) and reply["data"]["message"]
        assert not victim.closed.done()
        h.sim.paused = False
        await bystander.next("execution_success", lambda m: m["data"]["prompt_id"] == pending)
        victim.send("ping")
        await victim.next("pong")


async def test_outputs_are_served_only_to_their_owner_and_only_listed_files(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        prompt_id, _ = await alice.run(workflow("success"))
        mine = {"Authorization": "Bearer " + h.token("alice")}
        theirs = {"Authorization": "Bearer " + h.token("bob")}
        listing = await h.get(f"/outputs/{prompt_id}", mine)
        assert listing.code == 200
        files = json.loads(listing.body)["files"]
        assert {f["node"] for f in files} == {"6", "7"}
        f = next(f for f in files if f["type"] == "output")
        assert f["subfolder"].startswith("u_")  # ISOLATE_USERS: saved in Alice's own folder
        query = urlencode({"filename": f["filename"], "subfolder": f["subfolder"], "type": "output"})
        image = await h.get(f"/outputs/{prompt_id}/view?{query}", mine)
        assert image.headers.get("X-Content-Type-Options") == "nosniff"  # (finding: it was missing)
        assert image.code == 200 and image.body.startswith(b"\x89PNG")
        assert (await h.get(f"/outputs/{prompt_id}", theirs)).code == 404          # not Bob's
        assert (await h.get(f"/outputs/{prompt_id}/view?{query}", theirs)).code == 404
        assert (await h.get(f"/outputs/{prompt_id}")).code == 401                 # no token
        other = "filename=ComfyUI_00001_.png&subfolder=&type=output"               # a guessable name
        assert (await h.get(f"/outputs/{prompt_id}/view?{other}", mine)).code == 404


async def test_upgrades_wait_their_turn_and_every_outcome_frees_its_slot(io_loop):
    """MAX_CONCURRENT_UPGRADES=1: a second upgrade waits while the first checks its token; a
    refused token and a request that is not an upgrade give their slot back."""
    loop = asyncio.get_running_loop()
    async with ProxyHarness(max_concurrent_upgrades=1) as h:
        events = []
        alice_inside, release_alice = loop.create_future(), loop.create_future()
        verify = h.state.verifier.verify

        async def watched_verify(token):
            user = "alice" if token == alice_token else "bob"
            events.append(("start", user))
            if user == "alice":
                alice_inside.set_result(True)
                await release_alice
            identity = await verify(token)
            events.append(("end", user))
            return identity
        h.state.verifier.verify = watched_verify
        slots = h.state.registry.upgrades
        acquire, asked = slots.acquire, []
        bob_asked = loop.create_future()

        async def watched_acquire():
            asked.append(True)
            if len(asked) == 2:
                bob_asked.set_result(True)
            return await acquire()
        slots.acquire = watched_acquire

        alice_token = h.token("alice")
        alice = asyncio.ensure_future(h.connect("alice", token=alice_token))
        await asyncio.wait_for(alice_inside, TIMEOUT)
        bob = asyncio.ensure_future(h.connect("bob"))
        await asyncio.wait_for(bob_asked, TIMEOUT)
        assert events == [("start", "alice")]  # without the limit bob's check would have begun
        release_alice.set_result(True)
        await asyncio.wait_for(asyncio.gather(alice, bob), TIMEOUT)
        assert events == [("start", "alice"), ("end", "alice"), ("start", "bob"), ("end", "bob")]
        # A refused token, then a plain GET without the upgrade headers: both give the slot back.
        refused = await asyncio.wait_for(h.get("/ws", headers={"Authorization": "Bearer garbage"}), TIMEOUT)
        assert refused.code == 401
        not_upgrade = await asyncio.wait_for(
            h.get("/ws", headers={"Authorization": "Bearer " + h.token("carol")}), TIMEOUT)
        assert not_upgrade.code == 400
        carol = await h.connect("carol")
        assert carol.received[0]["data"]["user_id"] == "carol"
        assert not slots.locked()


async def test_frames_stay_whole_and_in_order_when_the_socket_backs_up(io_loop):
    """Small frames go to the socket directly while nothing is queued, and through the IOStream
    once the peer's buffers are full: the client still reads every frame, whole, in order."""
    async with ProxyHarness(max_outbound_buffer_bytes=16 * 1024 * 1024) as h:
        reader, writer = await raw_upgrade(h.port, h.token("alice"))
        first = await asyncio.wait_for(read_text_frame(reader), TIMEOUT)
        assert json.loads(first)["type"] == "session"  # the connection is open for the session's messages
        session = h.state.registry.sessions["alice"]
        conn = next(iter(session.connections))
        job = Job(str(uuid.uuid4()), "alice", "running", None)  # (the messages are about some job of hers)
        for i in range(4000):
            session.job_notice(job, "filler", {"i": i, "pad": "x" * 1000})
        assert conn.pending_bytes > 0  # the kernel's buffers filled: later frames were queued
        seqs, data = [], b""

        async def read_all():
            nonlocal data
            while len(seqs) < 4000:
                chunk = await reader.read(1 << 16)
                assert chunk, "closed early"
                data += chunk
                while len(data) >= 2:
                    n, start = data[1] & 0x7F, 2
                    if n == 126:
                        if len(data) < 4:
                            break
                        n, start = struct.unpack(">H", data[2:4])[0], 4
                    if len(data) < start + n:
                        break
                    assert data[0] == 0x81  # final text frame
                    message = json.loads(data[start:start + n])
                    if message["type"] == "filler":
                        assert message["data"]["i"] == len(seqs)
                        seqs.append(message["seq"])
                    data = data[start + n:]
        await asyncio.wait_for(read_all(), TIMEOUT)
        assert seqs == list(range(seqs[0], seqs[0] + 4000))
        writer.close()


@pytest.mark.parametrize("share", [False, True])
async def test_an_idle_user_learns_nothing_of_other_users_queue(io_loop, share):
    """ComfyUI's status broadcasts count everyone's prompts: by default a user is told the
    count of their own unfinished jobs, when it changes, and nothing when others work."""
    async with ProxyHarness(share_comfy_status=share) as h:
        alice, bob = await h.connect("alice"), await h.connect("bob")
        for _ in range(3):
            await bob.run(workflow("success"))
        alice.send("ping")
        await alice.next("pong")
        statuses = [m for m in alice.json_messages() if m["type"] == "status"]
        if share:
            assert statuses  # ComfyUI's own, as an operator who shares them wants
            return
        assert statuses == []
        prompt_id, _ = await alice.run(workflow("success"))
        await alice.next("status", lambda m: m["data"]["status"]["exec_info"]["queue_remaining"] == 0)
        counts = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in alice.json_messages()
                  if m["type"] == "status"]
        assert counts == [1, 0]
        bob_counts = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in bob.json_messages()
                      if m["type"] == "status"]
        assert bob_counts == [1, 0] * 3  # Bob's own three, and nothing of Alice's
