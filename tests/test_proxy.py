"""The core proxy end to end: auth at the upgrade, sessions, submit, relay and isolation,
against the in-process ComfyUI simulator."""
import asyncio
import json
import struct
import uuid

from comfy_ws_proxy.gateway.protocol import CloseCode

from .helpers import ProxyHarness, workflow

FINALS = ("execution_success", "execution_error", "execution_interrupted")


async def test_submit_and_receive_every_event_of_a_prompt(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        session = alice.received[0]
        assert session["type"] == "session" and session["data"]["user_id"] == "alice"
        assert session["data"]["resumed"] is False and session["data"]["session_id"]
        accepted = await alice.submit(workflow("success"))
        assert accepted["type"] == "prompt_accepted", accepted
        data = accepted["data"]
        assert data["queued"] is False and data["node_errors"] == {} and isinstance(data["number"], int)
        prompt_id = data["prompt_id"]
        assert str(uuid.UUID(prompt_id)) == prompt_id and uuid.UUID(prompt_id).version == 4
        await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == prompt_id)
        await alice.next("executing", lambda m: m["data"] == {"node": None, "prompt_id": prompt_id})
        kinds = [m["type"] for m in alice.json_messages()]
        for kind in ("execution_start", "execution_cached", "executing", "progress_state", "executed"):
            assert kind in kinds
        # Every JSON message carries a strictly increasing seq.
        seqs = [m["seq"] for m in alice.json_messages()]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        # Type and data unchanged: the executed output is ComfyUI's own.
        executed = [m for m in alice.json_messages() if m["type"] == "executed"]
        assert {m["data"]["node"] for m in executed} == {"6", "7"}
        assert all(set(m) == {"type", "data", "seq"} for m in alice.json_messages())
        # The upstream client id never reaches the client.
        statuses = [m for m in alice.json_messages() if m["type"] == "status"]
        assert statuses and all("sid" not in m["data"] for m in statuses)
        assert h.sim.execution_counts[prompt_id] == 1


async def test_client_prompt_id_is_used_and_bad_ones_refused(io_loop):
    async with ProxyHarness(max_connections_per_user=1) as h:
        alice = await h.connect("alice")
        bob = await h.connect("bob")
        mine = str(uuid.uuid4())
        accepted = await alice.submit(workflow("success"), prompt_id=mine)
        assert accepted["data"]["prompt_id"] == mine
        await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == mine)
        refused = await alice.submit(workflow("success"), prompt_id="NOT-A-UUID")
        assert refused["data"]["code"] == "invalid_message"
        # Bob cannot take over Alice's prompt id (and is not told whose it is).
        stolen = await bob.submit(workflow("success"), prompt_id=mine)
        assert stolen["type"] == "error" and stolen["data"]["code"] == "invalid_message"
        assert "alice" not in json.dumps(stolen)
        assert h.sim.execution_counts[mine] == 1


async def test_comfyui_400_reaches_the_client_unchanged(io_loop):
    async with ProxyHarness() as h:
        direct = await h.http.fetch(h.sim.url + "/prompt", method="POST", raise_error=False,
                                    body=json.dumps({"prompt": workflow("validation-fail")}))
        assert direct.code == 400
        expected = json.loads(direct.body)
        alice = await h.connect("alice")
        for name in ("validation-fail", "validation-fail-unknown-node", "validation-fail-no-outputs"):
            reply = await alice.submit(workflow(name))
            assert reply["type"] == "error", reply
            data = reply["data"]
            assert data["code"] == "invalid_prompt" and data["prompt_id"]
            if name == "validation-fail":
                assert data["error"] == expected["error"]
                assert data["node_errors"] == expected["node_errors"]
            assert data["message"] == data["error"]["message"]
        # The connection stays usable.
        _, outcome = await alice.run(workflow("success"))
        assert outcome == "execution_success"


async def test_bad_tokens_are_refused_before_the_upgrade(io_loop):
    async with ProxyHarness() as h:
        from comfy_ws_proxy.testing.tokens import DevKey
        stranger = DevKey.generate(h.key.kid)
        cases = {
            "none": None,
            "garbage": "garbage",
            "expired": h.token("alice", ttl=-600),
            "foreign key": stranger.token("alice"),
        }
        for name, token in cases.items():
            status, body = await h.refused(token)
            assert status == 401, name
            assert body["error"]["code"] == "unauthorized", name
            assert token is None or token not in json.dumps(body)
        assert h.sim.ws_clients == {} or all(v == 0 for v in h.sim.ws_clients.values())


async def test_browser_subprotocol_token_selects_ours_and_never_echoes(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice", via="subprotocol")
        assert alice.conn.selected_subprotocol == "comfy-ws-proxy.v1"
        _, outcome = await alice.run(workflow("success"))
        assert outcome == "execution_success"
        # ?token= is off by default.
        status, _ = await h.refused(h.token("alice"), via="query")
        assert status == 401


async def test_query_token_when_enabled(io_loop):
    async with ProxyHarness(allow_query_token=True) as h:
        alice = await h.connect("alice", via="query")
        assert alice.received[0]["type"] == "session"


async def test_connection_limit_per_user(io_loop):
    async with ProxyHarness(max_connections_per_user=1) as h:
        await h.connect("alice")
        second = await h.connect("alice", session_message=False)
        error = await second.next("error")
        assert error["data"] == {"code": "too_many_connections",
                                 "message": "Maximum connections per user exceeded"}
        code, _ = await asyncio.wait_for(second.closed, 10)
        assert code == CloseCode.TOO_MANY_CONNECTIONS
        # Another user is unaffected.
        bob = await h.connect("bob")
        assert bob.received[0]["type"] == "session"


async def test_two_connections_of_one_user_share_one_upstream_socket(io_loop):
    async with ProxyHarness(max_connections_per_user=2) as h:
        tab1 = await h.connect("alice")
        tab2 = await h.connect("alice")
        assert tab1.received[0]["data"]["session_id"] == tab2.received[0]["data"]["session_id"]
        prompt_id, _ = await tab1.run(workflow("success"))
        await tab2.next("execution_success", lambda m: m["data"]["prompt_id"] == prompt_id)
        assert sum(h.sim.ws_clients.values()) == 1


async def test_ping_pong_and_bad_messages_keep_the_connection(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        alice.send("ping", {"n": 1})
        pong = await alice.next("pong")
        assert pong["data"] == {"n": 1}
        for raw in ("{not json", "[]", '{"type": 5}', '{"type": "nope"}', '{"type": "submit_prompt"}',
                    '{"type": "submit_prompt", "data": {"prompt": []}}', '{"type": "cancel", "data": {}}'):
            alice.send_raw(raw)
            error = await alice.next("error")
            assert error["data"]["code"] == "invalid_message", raw
            assert error["data"]["message"]
        alice.send("ping")
        await alice.next("pong")


async def test_two_users_never_see_each_others_events_previews_or_text(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        bob = await h.connect("bob")
        a1, _ = await alice.run(workflow("success"))        # GetImageSize sends a broadcast TEXT frame
        a2, _ = await alice.run(workflow("success-ws"))     # SaveImageWebsocket sends previews
        bobs = workflow("success-ws")
        bobs["1"]["inputs"]["color"] = 1234  # not the same prompt: ComfyUI would serve it from cache
        b1, _ = await bob.run(bobs)
        alice_ids = {a1, a2}
        for m in bob.json_messages():
            assert m["data"].get("prompt_id") not in alice_ids, m
        for m in alice.json_messages():
            assert m["data"].get("prompt_id") != b1, m
        # Alice got her own text frame and previews; Bob only the previews of his prompt.
        alice_types = [struct.unpack(">I", f[:4])[0] for f in alice.binary_frames()]
        bob_types = [struct.unpack(">I", f[:4])[0] for f in bob.binary_frames()]
        assert 3 in alice_types and 3 not in bob_types
        assert alice_types.count(4) + alice_types.count(1) == 3
        assert bob_types.count(4) + bob_types.count(1) == 3
        for frame in bob.binary_frames():
            if struct.unpack(">I", frame[:4])[0] == 4:
                (length,) = struct.unpack(">I", frame[4:8])
                assert json.loads(frame[8:8 + length])["prompt_id"] == b1


async def test_an_8mb_preview_frame_is_relayed_intact(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        _, outcome = await alice.run(workflow("success-ws-large"))
        assert outcome == "execution_success"
        big = [f for f in alice.binary_frames() if len(f) > 8_000_000]
        assert len(big) == 1 and struct.unpack(">I", big[0][:4])[0] in (1, 4)


async def test_origin_is_never_forwarded_to_comfyui(io_loop):
    async with ProxyHarness(allowed_origins=["https://app.example"]) as h:
        alice = await h.connect("alice", headers={"Origin": "https://app.example"})
        await alice.run(workflow("success"))
        assert "Origin" not in h.sim.last_request_headers()
        status, body = await h.refused(h.token("mallory"), headers={"Origin": "https://evil.example"})
        assert status == 403 and body["error"]["code"] == "forbidden_origin"


async def test_message_too_large_is_an_error_not_a_close(io_loop):
    async with ProxyHarness(max_message_bytes=4096) as h:
        alice = await h.connect("alice")
        alice.send("submit_prompt", {"prompt": {"1": {"class_type": "x" * 5000}}})
        error = await alice.next("error")
        assert error["data"]["code"] == "message_too_large"
        alice.send("ping")
        await alice.next("pong")
