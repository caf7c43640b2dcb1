"""GET /job/{id}/events: Server-Sent Events with Last-Event-ID resume (issue 13)."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from .helpers import TIMEOUT, ProxyHarness, workflow

pytestmark = pytest.mark.usefixtures("io_loop")


def many_events(batch: int) -> dict:
    """A job with a progress event and a preview per image (SaveImageWebsocket)."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": batch,
                                                          "color": random.randrange(0xFFFFFF)}},
            "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}}}


async def submit(h, prompt: dict, user: str = "alice") -> str:
    answer = await h.http.fetch(h.url + "/generate", method="POST", body=json.dumps(prompt),
                                headers={"Authorization": "Bearer " + h.token(user)})
    return json.loads(answer.body)["job_id"]


async def open_stream(h, job_id: str, user: str = "alice", last_id: str | None = None):
    """A raw HTTP/1.0 request (no chunked encoding: the body is the event stream as sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    head = f"GET /job/{job_id}/events HTTP/1.0\r\nAuthorization: Bearer {h.token(user)}\r\n"
    if last_id:
        head += f"Last-Event-ID: {last_id}\r\n"
    writer.write((head + "\r\n").encode())
    return reader, writer


def parse(body: bytes) -> tuple[list[dict], int]:
    """The complete events in a stream body (and how many keepalive comments)."""
    events, comments = [], 0
    text = body.decode()
    *complete, _partial = text.split("\n\n")
    for block in complete:
        if block.startswith(":"):
            comments += 1
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append({"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])})
    return events, comments


async def read_until_closed(reader, limit: int | None = None) -> bytes:
    data = b""
    while limit is None or len(data) < limit:
        chunk = await asyncio.wait_for(reader.read(65536 if limit is None else limit - len(data)), TIMEOUT)
        if not chunk:
            break
        data += chunk
    return data


def body_of(response: bytes) -> tuple[str, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head.decode(), body


async def test_a_job_streams_from_snapshot_to_done_and_only_to_its_owner():
    async with ProxyHarness() as h:
        h.sim.paused = True
        job_id = await submit(h, workflow("success"))
        reader, writer = await open_stream(h, job_id)
        first = await asyncio.wait_for(reader.readuntil(b"event: snapshot"), TIMEOUT)
        assert b"200 OK" in first and b"text/event-stream" in first
        h.sim.paused = False
        head, body = body_of(first + await read_until_closed(reader))
        writer.close()
        events, _ = parse(body)
        names = [e["event"] for e in events]
        assert names[0] == "snapshot" and names[-1] == "done"
        assert "status" in names and "progress" in names and "output" in names
        assert events[-1]["data"]["status"] == "completed" and events[-1]["data"]["job_id"] == job_id
        outputs = [e["data"] for e in events if e["event"] == "output"]
        assert {o["node_id"] for o in outputs} == {"6", "7"}
        offsets = [int(e["id"].split("-")[1]) for e in events]
        assert offsets[1:] == list(range(offsets[0] + 1, offsets[0] + len(events)))  # no gap, no repeat
        # Another user's job is not found, exactly like an unknown one.
        for who in (job_id, "00000000-0000-4000-8000-000000000000"):
            reader, writer = await open_stream(h, who, user="bob")
            head, body = body_of(await read_until_closed(reader))
            writer.close()
            assert head.startswith("HTTP/1.1 404") and json.loads(body)["error"]["code"] == "not_found"
        # An ended job's stream is its "done" at once.
        reader, writer = await open_stream(h, job_id)
        events, _ = parse(body_of(await read_until_closed(reader))[1])
        writer.close()
        assert [e["event"] for e in events] == ["done"]


async def test_a_watcher_dropped_a_thousand_times_sees_every_event_once_in_order():
    rng = random.Random(1234)
    async with ProxyHarness(sse_log_events=20000, submit_burst=1000) as h:
        h.sim.paused = True
        job_id = await submit(h, many_events(3000))
        reader, writer = await open_stream(h, job_id)
        start = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)  # the headers
        start += await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT)  # the snapshot
        writer.close()
        [snapshot], _ = parse(body_of(start)[1])
        assert snapshot["event"] == "snapshot"
        h.sim.paused = False
        seen, last_id, drops = [], snapshot["id"], 0
        while not seen or seen[-1]["event"] != "done":
            reader, writer = await open_stream(h, job_id, last_id=last_id)
            data = await read_until_closed(reader, limit=rng.randint(1, 1500))  # cut anywhere
            writer.close()
            drops += 1
            head, body = body_of(data)
            if not head.startswith("HTTP/1.1 200"):
                continue  # cut inside the headers
            events, _ = parse(body)
            assert all(e["event"] != "snapshot" for e in events)  # resumed, never started over
            seen += events
            if events:
                last_id = events[-1]["id"]
        assert drops >= 1000
        offsets = [int(e["id"].split("-")[1]) for e in seen]
        first = int(snapshot["id"].split("-")[1]) + 1
        assert offsets == list(range(first, first + len(seen)))  # every event once, in order
        assert sum(1 for e in seen if e["event"] == "preview") == 3000
        assert seen[-1]["data"]["status"] == "completed"


async def test_an_unknown_epoch_or_a_gap_starts_over_and_idle_streams_get_keepalives():
    async with ProxyHarness(sse_heartbeat_s=0.02, sse_log_events=3, max_event_streams_per_user=1) as h:
        h.sim.paused = True
        job_id = await submit(h, many_events(20))
        reader, writer = await open_stream(h, job_id, last_id="deadbeef-7")  # another process's id
        data = await asyncio.wait_for(reader.readuntil(b"event: snapshot"), TIMEOUT)
        data += await asyncio.wait_for(reader.readuntil(b": keepalive\n\n"), TIMEOUT)  # nothing happens
        # one stream per user here: a second is refused while this one is open
        second = await h.http.fetch(h.url + f"/job/{job_id}/events", raise_error=False,
                                    headers={"Authorization": "Bearer " + h.token("alice")})
        assert second.code == 429 and json.loads(second.body)["error"]["code"] == "too_many_streams"
        writer.close()
        events, _ = parse(body_of(data)[1].split(b": keepalive")[0])
        snapshot = events[0]
        assert snapshot["event"] == "snapshot" and snapshot["data"]["status"] == "pending"
        h.sim.paused = False
        done = json.loads((await h.http.fetch(h.url + f"/job/{job_id}", headers={
            "Authorization": "Bearer " + h.token("alice"), "Prefer": "wait=10"})).body)
        assert done["status"] == "completed"
        # The log keeps 3 events: the snapshot's successors are gone, so it starts over (with
        # the job's end, as the job has ended).
        reader, writer = await open_stream(h, job_id, last_id=snapshot["id"])
        events, _ = parse(body_of(await read_until_closed(reader))[1])
        writer.close()
        assert [e["event"] for e in events] == ["done"]


async def test_an_outcome_seen_on_the_event_stream_is_still_owed_to_the_websocket():
    async with ProxyHarness() as h:
        job_id = await submit(h, workflow("success"))
        reader, writer = await open_stream(h, job_id)
        events, _ = parse(body_of(await read_until_closed(reader))[1])
        writer.close()
        assert events[-1]["event"] == "done"
        alice = await h.connect("alice")
        # (were the stream's "done" counted as telling the owner, this would never come)
        await alice.next("execution_success", lambda m: m["data"]["prompt_id"] == job_id)


async def test_many_watchers_of_a_busy_job_all_see_its_end_at_once(tmp_path):
    """Events that arrive while a stream is flushing are sent without waiting for the next
    wake-up (a lost wake-up had held watchers until the keepalive, 15 s). The proxy is a real
    process, so that its flushes and ComfyUI's events interleave as in production."""
    from comfy_ws_proxy.testing.comfyui import ComfySimulator
    from comfy_ws_proxy.testing.tokens import DevKey

    from .test_durability import ProxyProcess

    sim = ComfySimulator()
    await sim.start()
    key = DevKey.generate()
    proxy = ProxyProcess(tmp_path, sim.url, key, sse_heartbeat_s=3600, max_event_streams_per_user=200)
    try:
        await proxy.start()
        token = key.token("alice")
        sim.paused = True
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        body = json.dumps(many_events(400)).encode()
        writer.write(f"POST /generate HTTP/1.0\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        job_id = json.loads(body_of(await read_until_closed(reader))[1])["job_id"]
        writer.close()
        streams = []
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(f"GET /job/{job_id}/events HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            streams.append((reader, writer))
        for reader, _ in streams:
            await asyncio.wait_for(reader.readuntil(b"event: snapshot"), TIMEOUT)
        sim.paused = False
        bodies = await asyncio.gather(*(read_until_closed(reader) for reader, _ in streams))
        for _, writer in streams:
            writer.close()
        for data in bodies:
            events, _ = parse(b"id: 0-0\nevent: snapshot" + data)
            assert events[-1]["event"] == "done"
    finally:
        if proxy.proc is not None and proxy.proc.returncode is None:
            proxy.proc.terminate()
            await proxy.proc.wait()
        await sim.stop()
