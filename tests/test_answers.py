"""Every client message is answered once, on its connection, and the answer says which
message it answers: the ``ref`` the client chose, and the prompt id when one is known (the
client's, or the one the proxy assigned), for the proxy's own refusals too."""
import json
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_ws_proxy.gateway.protocol import (
    MAX_REF_LENGTH,
    SCAN_CHARS,
    MessageError,
    read_request,
    scan_prefix,
    valid_ref,
)

from .helpers import FakeClock, ProxyHarness, workflow

LIMITS = {"max_message_bytes": 4096, "max_prompt_nodes": 10}


def answer_to(client, ref):
    return client.next(where=lambda m: m.get("ref") == ref)


def frame(kind, data, ref=None):
    message = {"type": kind}
    if ref is not None:
        message["ref"] = ref
    message["data"] = data
    return json.dumps(message)


# --- the proxy's own refusals -----------------------------------------------------------------------

async def test_the_proxys_refusals_carry_the_ref_and_the_prompt_id(io_loop):
    async with ProxyHarness(node_allowlist=["CheckpointLoaderSimple", "EmptyLatentImage", "KSampler",
                                            "CLIPTextEncode", "VAEDecode", "SaveImage"],
                            max_prompt_nodes=7, max_message_bytes=4096) as h:
        alice = await h.connect("alice")
        mine = str(uuid.uuid4())
        # the node allowlist
        alice.send_raw(frame("submit_prompt", {"prompt_id": mine, "prompt": {"1": {"class_type": "Evil"}}}, 1))
        refused = await answer_to(alice, 1)
        assert refused["type"] == "error" and refused["data"]["code"] == "invalid_prompt"
        assert refused["data"]["prompt_id"] == mine
        # MAX_PROMPT_NODES
        big = {str(i): {"class_type": "KSampler", "inputs": {}} for i in range(8)}
        alice.send_raw(frame("submit_prompt", {"prompt_id": mine, "prompt": big}, "two"))
        refused = await answer_to(alice, "two")
        assert refused["data"]["code"] == "invalid_prompt" and refused["data"]["prompt_id"] == mine
        # a UI-format graph (what ComfyUI's "Save" writes, not its API format)
        ui = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "links": [], "version": 0.4}
        alice.send_raw(frame("submit_prompt", {"prompt": ui}, 3))
        refused = await answer_to(alice, 3)
        assert refused["data"]["code"] == "invalid_prompt" and "prompt_id" not in refused["data"]  # none known
        # a message too large: its ref and prompt id are read from its beginning
        alice.send_raw(frame("submit_prompt", {"prompt_id": mine, "prompt": {"1": {"class_type": "x" * 5000}}}, 4))
        refused = await answer_to(alice, 4)
        assert refused["data"]["code"] == "message_too_large" and refused["data"]["prompt_id"] == mine
        # not JSON (cut short): likewise
        alice.send_raw(frame("submit_prompt", {"prompt_id": mine, "prompt": {"1": {}}}, 5)[:-10])
        refused = await answer_to(alice, 5)
        assert refused["data"]["code"] == "invalid_message" and refused["data"]["prompt_id"] == mine
        # an unknown type, a bad cancel
        alice.send_raw(frame("nope", {}, 6))
        assert (await answer_to(alice, 6))["data"]["code"] == "invalid_message"
        alice.send_raw(frame("cancel", {}, 7))
        assert (await answer_to(alice, 7))["data"]["code"] == "invalid_message"
        # nothing readable: an error without a ref (the client fails its oldest request)
        alice.send_raw("garbage")
        error = await alice.next("error")
        assert "ref" not in error and error["data"]["code"] == "invalid_message"
        # a ref that is not one: refused, and not echoed
        for bad in ([1], {"a": 1}, True, "", "x" * (MAX_REF_LENGTH + 1), "a\nb", 2 ** 60, 1.5):
            alice.send_raw(json.dumps({"type": "ping", "ref": bad, "data": {}}))
            error = await alice.next("error")
            assert "ref" not in error and error["data"]["code"] == "invalid_message" and "ref" in error["data"]["message"]
        alice.send_raw(frame("ping", {}, 8))
        assert (await answer_to(alice, 8))["type"] == "pong"


async def test_rate_limited_says_which_prompt_even_one_the_proxy_named(io_loop):
    async with ProxyHarness(submit_burst=1, submit_rate_per_s=0.001, clock=FakeClock()) as h:
        alice = await h.connect("alice")
        alice.send_raw(frame("submit_prompt", {"prompt": workflow("success")}, "a"))
        accepted = await answer_to(alice, "a")
        assert accepted["type"] == "prompt_accepted"
        mine = str(uuid.uuid4())
        alice.send_raw(frame("submit_prompt", {"prompt_id": mine, "prompt": workflow("success")}, "b"))
        limited = await answer_to(alice, "b")
        assert limited["data"]["code"] == "rate_limited" and limited["data"]["prompt_id"] == mine
        alice.send_raw(frame("submit_prompt", {"prompt": workflow("success")}, "c"))
        limited = await answer_to(alice, "c")
        assert limited["data"]["code"] == "rate_limited"
        assert uuid.UUID(limited["data"]["prompt_id"])  # the id the proxy assigned before refusing it
        assert h.state.tracker.get(limited["data"]["prompt_id"]) is None


# --- answers that come from the job service ------------------------------------------------------

async def test_job_notices_that_answer_a_request_carry_its_ref_to_that_connection_only(io_loop):
    async with ProxyHarness(max_connections_per_user=2, max_comfy_jobs_per_user=1) as h:
        alice = await h.connect("alice")
        other = await h.connect("alice")  # the same user's second connection
        hold = h.sim.hold_node("3")
        alice.send_raw(frame("submit_prompt", {"prompt": workflow("long-running")}, 1))
        accepted = await answer_to(alice, 1)
        running = accepted["data"]["prompt_id"]
        assert accepted["type"] == "prompt_accepted" and accepted["data"]["queued"] is False
        seen = await other.next("prompt_accepted", lambda m: m["data"]["prompt_id"] == running)
        assert "ref" not in seen and seen["seq"] == accepted["seq"]  # the same message, without the ref
        await hold.reached
        await alice.next("execution_start", lambda m: m["data"]["prompt_id"] == running)  # (the proxy knows)
        # one of alice's jobs in ComfyUI already: the next waits in the proxy
        alice.send_raw(frame("submit_prompt", {"prompt": workflow("success")}, 2))
        queued = await answer_to(alice, 2)
        assert queued["type"] == "prompt_accepted" and queued["data"]["queued"] is True
        waiting = queued["data"]["prompt_id"]
        # cancel a queued job: prompt_cancelled answers
        alice.send_raw(frame("cancel", {"prompt_id": waiting}, 3))
        cancelled = await answer_to(alice, 3)
        assert cancelled["type"] == "prompt_cancelled" and cancelled["data"]["prompt_id"] == waiting
        assert "ref" not in await other.next("prompt_cancelled")
        # cancel a running job: cancel_accepted answers, execution_interrupted follows
        alice.send_raw(frame("cancel", {"prompt_id": running}, 4))
        interrupting = await answer_to(alice, 4)
        assert interrupting["type"] == "cancel_accepted"
        assert interrupting["data"] == {"prompt_id": running, "state": "running"}
        hold.release()
        await alice.next("execution_interrupted", lambda m: m["data"]["prompt_id"] == running)
        # a cancel too late: the job's state says so
        alice.send_raw(frame("cancel", {"prompt_id": running}, 5))
        late = await answer_to(alice, 5)
        assert late["type"] == "error" and late["data"]["prompt_id"] == running
        # someone else's (or no) job
        alice.send_raw(frame("cancel", {"prompt_id": str(uuid.uuid4())}, 6))
        assert (await answer_to(alice, 6))["data"]["code"] == "not_found"
        # ComfyUI's own rejection (a 400) answers a submit too
        alice.send_raw(frame("submit_prompt", {"prompt": workflow("validation-fail")}, 7))
        rejected = await answer_to(alice, 7)
        assert rejected["type"] == "error" and rejected["data"]["code"] == "invalid_prompt"
        assert rejected["data"]["node_errors"]
        # resume is answered by prompts_state
        session_id = (alice.json_messages()[0])["data"]["session_id"]
        alice.send_raw(frame("resume", {"session_id": session_id, "last_seq": alice.json_messages()[-1]["seq"]}, 8))
        state = await answer_to(alice, 8)
        assert state["type"] == "prompts_state"
        assert not h.state.registry.sessions["alice"].awaited  # nothing left waiting


async def test_a_message_without_ref_is_answered_as_before(io_loop):
    async with ProxyHarness() as h:
        alice = await h.connect("alice")
        accepted = await alice.submit(workflow("success"))
        assert accepted["type"] == "prompt_accepted" and "ref" not in accepted
        alice.send("ping", {"n": 1})
        pong = await alice.next("pong")
        assert pong["data"] == {"n": 1} and "ref" not in pong


# --- the parser ------------------------------------------------------------------------------------

def test_scan_prefix_reads_what_comes_before_the_first_nested_value():
    pid = str(uuid.uuid4())
    text = json.dumps({"type": "submit_prompt", "ref": 7, "data": {"prompt_id": pid, "prompt": {"1": {}}}})
    assert scan_prefix(text) == {"type": "submit_prompt", "ref": 7, "data": {"prompt_id": pid}}
    assert scan_prefix(text[:text.index(pid) + 10]) == {"type": "submit_prompt", "ref": 7, "data": {}}
    assert scan_prefix(text[:text.index('"data"')]) == {"type": "submit_prompt", "ref": 7}
    # a ref after data is not seen; one cut off by the end of the prefix is not taken
    assert "ref" not in scan_prefix(json.dumps({"data": {"prompt": {}}, "ref": 1}))
    assert scan_prefix('{"ref": 12') == {}
    assert scan_prefix('{"ref": 12345}'[:10]) == {}
    # only the first SCAN_CHARS characters are read
    padded = json.dumps({"type": "ping", "pad": "x" * SCAN_CHARS, "ref": 1})
    assert "ref" not in scan_prefix(padded)
    for junk in ("", "[", "{", '{"a"', '{"a":', "{1: 2}", '{"a": NaN, "ref": 1}', "null", b"{}", "{" * 5000):
        assert isinstance(scan_prefix(junk), dict)


def test_read_request_echoes_what_it_can():
    pid = str(uuid.uuid4())
    try:
        read_request(frame("submit_prompt", {"prompt_id": pid, "prompt": {str(i): {} for i in range(11)}}, "r"),
                     **LIMITS)
    except MessageError as e:
        assert (e.code, e.ref, e.prompt_id) == ("invalid_prompt", "r", pid)
    else:
        raise AssertionError("a prompt over MAX_PROMPT_NODES was accepted")
    request = read_request(frame("refresh_token", {"token": "t"}, 2 ** 53), **LIMITS)
    assert request.ref == 2 ** 53 and request.body.token == "t"


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=70)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000) | st.builds(lambda ref, pad: json.dumps({"ref": ref, "data": {"x": pad}}),
                                           json_scalars, st.text(max_size=3000)))
def test_any_frame_gives_a_request_or_an_error_and_only_a_valid_ref(text):
    for candidate in (text, text[: len(text) // 2]):
        try:
            request = read_request(candidate, **LIMITS)
            ref = request.ref
        except MessageError as e:
            assert e.code in ("invalid_message", "invalid_prompt", "message_too_large")
            ref = e.ref
        assert ref is None or valid_ref(ref)
