"""Property tests of the pure pieces the isolation and fairness promises rest on: the routing
of upstream frames (backends/routing.py), the proxy's fair queue (jobs/queue.py) and the
client message parser (gateway/protocol.py)."""
import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfy_ws_proxy.backends.routing import REGISTERED, next_running, route
from comfy_ws_proxy.gateway.protocol import Cancel, Ping, Resume, parse_client_message
from comfy_ws_proxy.jobs.queue import FairQueue
from comfy_ws_proxy.model import RequestError, SubmitRequest

# --- a model of ComfyUI's event bus ---------------------------------------------------------------


def text(kind: str, **data) -> str:
    return json.dumps({"type": kind, "data": data})


def preview_with_metadata(prompt_id: str) -> bytes:
    meta = json.dumps({"node_id": "2", "prompt_id": prompt_id, "image_type": "image/jpeg"}).encode()
    return struct.pack(">II", 4, len(meta)) + meta + b"\xff\xd8jpeg"


def text_frame(node: str, message: str) -> bytes:
    return struct.pack(">II", 3, len(node)) + node.encode() + message.encode()


def prompt_frames(prompt_id: str, nodes: int, cached: bool, ending: str):
    """What one prompt emits, in order: (to the owner's client id only?, frame, ComfyUI's
    last node id after it). Type-3 text and status are broadcast to every socket
    (PROTOCOL.md 3.5, 3.6); the last node id is what a reconnecting socket is replayed."""
    yield True, text("execution_start", prompt_id=prompt_id), None
    yield True, text("execution_cached", nodes=[str(n) for n in range(nodes)] if cached else [],
                     prompt_id=prompt_id), None
    if not cached:
        for n in range(nodes):
            node = str(n)
            yield True, text("executing", node=node, display_node=node, prompt_id=prompt_id), node
            yield True, text("progress", value=1, max=2, prompt_id=prompt_id, node=node), node
            yield True, preview_with_metadata(prompt_id), node
            yield True, struct.pack(">II", 1, 1) + b"legacy preview", node  # type 1: no prompt id
            yield False, text_frame(node, f"secret of {prompt_id}"), node     # type 3: broadcast
            yield True, text("executed", node=node, display_node=node, output={"text": [prompt_id]},
                             prompt_id=prompt_id), node
    yield True, text(ending, prompt_id=prompt_id), None
    yield False, text("status", status={"exec_info": {"queue_remaining": 0}}), None
    yield True, text("executing", node=None, prompt_id=prompt_id), None
    # (after this, ComfyUI no longer runs it)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_no_frame_reaches_a_user_who_does_not_own_it(data):
    """Any number of users, prompts run in any order (some fully cached, some interrupted), any
    user's socket dropping and coming back at any moment (with ComfyUI's reconnect replay), and
    reconciliations whose answers arrive late: every frame routed to a user is that user's."""
    n_users = data.draw(st.integers(2, 4), label="users")
    users = [f"u{i}" for i in range(n_users)]
    prompts = []
    for user in users:
        for k in range(data.draw(st.integers(0, 3), label=f"prompts of {user}")):
            prompts.append((f"{user}-p{k}", user))
    order = data.draw(st.permutations(prompts), label="run order")
    owner = dict(prompts)
    # What the proxy believes (the tracker): running from our execution_start to our final, or
    # as a reconciliation found it.
    believed: dict[str, str] = {}
    up = {u: True for u in users}
    running = {u: None for u in users}  # each link's running job
    answers = {u: [] for u in users}    # reconciliation answers not applied yet: (socket, running job then)
    socket = {u: 0 for u in users}      # which socket (registration) each user's link is on
    ended = {u: set() for u in users}   # jobs each user's current socket saw end
    received = {u: [] for u in users}
    true_running = None
    last_node = None

    def deliver(user: str, frame, producer: str | None):
        routed = route(frame, owns=lambda j: owner.get(j) == user, running=running[user],
                       is_running=lambda j: believed.get(j) == "running")
        if routed is None or routed is REGISTERED or routed.kind == "status":
            return
        assert owner[routed.job_id] == user, (user, routed)
        assert producer is not None and owner[producer] == user, (user, frame, producer)  # the true source
        after = next_running(running[user], routed)
        if (routed.job_id == running[user] and after is None) or \
                (routed.kind == "executing" and routed.data.get("node", "") is None):
            ended[user].add(routed.job_id)
        running[user] = after
        received[user].append(routed)
        if routed.kind == "execution_start":
            believed[routed.job_id] = "running"
        elif routed.kind.startswith("execution_") and routed.kind != "execution_cached":
            believed[routed.job_id] = "finished"

    def socket_events():
        for user in users:
            if data.draw(st.integers(0, 9), label="socket event") == 0:
                if up[user]:
                    up[user] = False
                    running[user] = None  # the link forgets it with the socket
                    ended[user] = set()
                else:
                    up[user] = True
                    socket[user] += 1
                    deliver(user, text("status", status={}, sid="cid"), None)
                    if true_running is not None and owner[true_running] == user and last_node is not None:
                        deliver(user, text("executing", node=last_node), true_running)  # the replay
                    answers[user].append((socket[user], true_running))  # a reconciliation asks now...
            if answers[user] and data.draw(st.booleans(), label="answer arrives"):
                asked_on, now_running = answers[user].pop(0)  # ...and its answer (from then) comes later
                for job_id, who in prompts:
                    if who == user and believed.get(job_id) != "finished":
                        believed[job_id] = "running" if job_id == now_running else believed.get(job_id, "pending")
                # As the reconciler does: only a socket registered before the question, and
                # still the same one, takes the job as running again.
                if now_running is not None and owner[now_running] == user and up[user] and running[user] is None \
                        and socket[user] == asked_on and now_running not in ended[user] \
                        and believed.get(now_running) == "running":
                    running[user] = now_running

    for job_id, who in order:
        cached = data.draw(st.booleans(), label="cached")
        ending = data.draw(st.sampled_from(["execution_success", "execution_error", "execution_interrupted"]))
        true_running = job_id
        for to_owner_only, frame, node in prompt_frames(job_id, 2, cached, ending):
            socket_events()
            last_node = node
            producer = None if isinstance(frame, str) and frame.startswith('{"type": "status"') else job_id
            for user in users:
                if up[user] and (not to_owner_only or user == who):
                    deliver(user, frame, producer)
        true_running, last_node = None, None
    # And the routing is not simply dropping everything: an owner whose socket never dropped
    # heard every frame of its own prompts that carries a prompt id.
    for user in users:
        assert all(owner[r.job_id] == user for r in received[user])


def test_the_routing_rules_one_by_one():
    mine, theirs = "mine", "theirs"
    owns = {mine}.__contains__
    running = lambda j: True  # noqa: E731
    assert route(text("status", status={}, sid="x"), owns=owns, running=None, is_running=running) is REGISTERED
    assert route(text("status", status={}), owns=owns, running=None, is_running=running).kind == "status"
    assert route(text("progress", prompt_id=mine), owns=owns, running=None, is_running=running).job_id == mine
    assert route(text("progress", prompt_id=theirs), owns=owns, running=None, is_running=running) is None
    assert route(text("display_component", component="x"), owns=owns, running=mine, is_running=running) is None
    assert route(preview_with_metadata(theirs), owns=owns, running=mine, is_running=running) is None
    assert route(preview_with_metadata(mine), owns=owns, running=None, is_running=running).kind == "preview"
    secret = text_frame("4", "width: 321")
    assert route(secret, owns=owns, running=None, is_running=running) is None
    assert route(secret, owns=owns, running=mine, is_running=running).kind == "text"
    # The socket saw our job start, but it has ended (as the tracker knows): not ours any more.
    assert route(secret, owns=owns, running=mine, is_running=lambda j: False) is None
    assert route(text("executing", node="3"), owns=owns, running=mine, is_running=running).job_id == mine
    assert route(text("executing", node="3"), owns=owns, running=None, is_running=running) is None
    assert route("not json", owns=owns, running=mine, is_running=running) is None
    assert route(b"\x00", owns=owns, running=None, is_running=running) is None


# --- the fair queue --------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "requeue", "remove", "serve"]), st.integers(0, 3)),
                max_size=60))
def test_the_fair_queue_is_fifo_per_owner_and_round_robin(ops):
    queue = FairQueue()
    model: dict[str, list[tuple[int, str]]] = {}
    gone: list[tuple[str, str, int]] = []
    order = 0
    served_since_round: list[str] = []
    for op, n in ops:
        owner = f"o{n}"
        if op == "add":
            order += 1
            queue.add(owner, f"j{order}", order)
            model.setdefault(owner, []).append((order, f"j{order}"))
        elif op == "requeue" and gone:  # ComfyUI lost it: back, ahead of later ones
            who, job_id, job_order = gone.pop(n % len(gone))
            queue.add(who, job_id, job_order)
            model.setdefault(who, []).append((job_order, job_id))
        elif op == "remove" and model.get(owner):
            job_order, job_id = model[owner].pop(n % len(model[owner]))
            queue.remove(owner, job_id)
        elif op == "serve" and queue.owners():
            first = queue.owners()[0]
            # round-robin: nobody is served twice while another owner with jobs waits its turn
            waiting = [o for o in model if model[o]]
            assert first not in served_since_round or set(waiting) <= set(served_since_round)
            if set(waiting) <= set(served_since_round):
                served_since_round = []
            served_since_round.append(first)
            job_id = queue.head(first)
            assert job_id == min(model[first])[1]  # FIFO by order within the owner
            model[first].remove(min(model[first]))
            queue.remove(first, job_id)
            queue.rotate(first)
            gone.append((first, job_id, int(job_id[1:])))
        for who in list(model):
            if not model[who]:
                del model[who]
        assert set(queue.owners()) == set(model)
        assert len(queue) == sum(len(v) for v in model.values())
        for who, jobs in model.items():
            assert queue.head(who) == min(jobs)[1]


# --- the client message parser ----------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4),
                           max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=64), json_values.map(json.dumps),
                 st.builds(lambda kind, data: json.dumps({"type": kind, "data": data}),
                           st.sampled_from(["submit_prompt", "cancel", "resume", "ping", "other"]), json_values)))
def test_the_parser_returns_a_message_or_a_request_error_never_anything_else(frame):
    try:
        message = parse_client_message(frame, max_prompt_nodes=5, node_allowlist=())
    except RequestError as e:
        assert e.code in ("invalid_message", "invalid_prompt") and e.message
        return
    assert isinstance(message, (SubmitRequest, Cancel, Resume, Ping))
    if isinstance(message, SubmitRequest):
        assert isinstance(message.prompt, dict) and 0 < len(message.prompt) <= 5
        assert all(isinstance(node, dict) for node in message.prompt.values())
