"""The result cache (RESULT_CACHE): a prompt identical to one that succeeded is answered at
once from the proxy's own copy of its outputs, without touching ComfyUI.

ComfyUI's own cache is per process, volatile and evicted by interleaved users; this one is
durable (its index in the store, its files in CACHE_DIR), bounded, scoped per user unless
the operator shares it, and never answers with a wrong image: the key is a canonical hash of
everything that determines the outputs (docs/cache.rst):

- each node's **Merkle hash**: its class_type and inputs, every link replaced by the
  upstream node's hash and output slot, so node ids vanish (renumbering, key order and UI
  metadata such as ``_meta`` change nothing) while any value, seed or model name changes it;
- the **content hash** (sha256) of every file a node loads: a user's uploads (named by their
  hash), other files fetched from the backend's /view (streamed, bounded: a file that cannot
  be hashed makes the prompt uncacheable);
- the **output selection** (partial_execution_targets, as node hashes);
- the **scope** (the user, or "shared") and, for an entry, the backend's **environment**
  fingerprint (ComfyUI's version, its models). An unknown environment is never cached.

Nothing of ``extra_data`` is in the key: nodes see only its ``extra_pnginfo`` (the UI's
workflow, written into PNG metadata, not pixels) and the comfy.org credentials of API nodes;
a prompt that carries those credentials calls external services and is not cached.

Identical requests in flight share one execution (single flight): the first leads (it runs),
the others wait (state ``waiting``) and are answered as hits once its outputs are stored. A
leader that fails, is cancelled or times out hands the lead to the first follower; one whose
outputs cannot be stored (too large, the backend gone) lets every follower run.

A hit is a normal job (``completed``, ``cached: true``) whose outputs are its own: the
files are content-addressed copies in CACHE_DIR, served by the proxy, and kept as long as
an entry or a remembered job names them, so evicting an entry or deleting ComfyUI's files
never breaks a download.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import mimetypes
import os
import re
import tempfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from tornado.ioloop import PeriodicCallback

from ..backends.backend import ComfyRejected, ComfyUnavailable
from ..backends.pool import BackendPool
from ..metrics import Metrics
from ..model import CacheEntry, Job, JobState, SubmitRequest
from ..store import StoreError
from .isolation import ANNOTATIONS, BUILTIN_FILE_INPUTS, CACHE_SCOPE_INPUT
from .tracker import JobTracker

log = logging.getLogger(__name__)

KEY_VERSION = 1  # bumped when the key's definition changes: old entries then simply never match
SHARED_SCOPE = "shared"

# ComfyUI's nodes (0.3.64) whose outputs are not a pure function of their inputs, or whose
# effect is not a file a hit could replay; CACHE_UNCACHEABLE_NODES adds custom ones.
DEFAULT_UNCACHEABLE_NODES = frozenset({
    "SaveImageWebsocket",     # its images exist only as WebSocket frames (and IS_CHANGED is the time)
    "WebcamCapture",          # a live camera
    "LoadImageSetFromFolderNode", "LoadImageTextSetFromFolderNode",  # a folder's current contents
    "GeminiInputFiles", "OpenAIInputFiles",  # files for external services
    # side effects a hit would skip: model files written into ComfyUI's folders
    "CheckpointSave", "ImageOnlyCheckpointSave", "CLIPSave", "VAESave", "ModelSave", "LoraSave",
    "SaveLoRANode", "TrainLoraNode",
})
# extra_data keys that reach nodes: credentials of comfy.org's API nodes (external services)
CREDENTIAL_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
# An upload's reference after confinement: <folder>/<sha256>.<ext>, named by its content.
UPLOAD_NAME = re.compile(r"^(?:(u_[0-9a-f]{24})/)?([0-9a-f]{64})\.(?:png|jpg|gif|webp)(?: \[input\])?$")
CHUNK = 256 * 1024


class NotCacheable(Exception):
    """Why a prompt is run without the cache (``reason``: a short stable word)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _is_link(value) -> bool:
    """ComfyUI's graph_utils.is_link: ``[node_id: str, slot: int|float]``."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool))


def _annotated(value) -> bool:
    return isinstance(value, str) and any(value.endswith(suffix) for suffix in ANNOTATIONS)


@dataclass(frozen=True)
class FileRef:
    """A file a node loads: where it is in the prompt, as the user wrote it, and where it is
    on the backend (after the confinement to the user's folder)."""
    node_id: str
    input_name: str
    member: str | None  # Load3D's {"image": ..., "mask": ...}: which member
    written: str
    located: str


def file_refs(prompt: dict, confined: dict, file_inputs: frozenset) -> list[FileRef]:
    """The files ``prompt`` loads: the known loaders' inputs and any ``name [output]``-style
    string. Raises NotCacheable for a file input given by a link (its name is computed)."""
    refs = []
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        class_type = node.get("class_type")
        located_inputs = (confined.get(node_id) or {}).get("inputs") or {}
        for name, value in inputs.items():
            known = (class_type, name) in file_inputs
            located = located_inputs.get(name, value)
            if known and isinstance(value, dict):
                for member, item in value.items():
                    if isinstance(item, str):
                        refs.append(FileRef(node_id, name, member, item,
                                            located.get(member, item) if isinstance(located, dict) else item))
            elif known or _annotated(value):
                if not isinstance(value, str):
                    if known:
                        raise NotCacheable("input_file")
                    continue
                refs.append(FileRef(node_id, name, None, value, located if isinstance(located, str) else value))
    return refs


def node_hashes(prompt: dict, file_hashes: dict[tuple[str, str], str | dict]) -> dict[str, str]:
    """Every node's Merkle hash: class_type and inputs, links replaced by (upstream hash,
    slot), loaded files by their content hash (``file_hashes[(node, input)]``: a sha256, or
    a member -> sha256 dict); nothing else of the node (``_meta``...). Iterative (a
    2,000-node chain is deeper than Python's recursion). Raises NotCacheable for a graph
    ComfyUI would refuse (a link to a missing node, a cycle, a node without a class)."""
    hashes: dict[str, str] = {}
    entered: set[str] = set()  # on the path being walked: meeting one again is a cycle
    for root in prompt:
        stack = [root]
        while stack:
            node_id = stack[-1]
            if node_id in hashes:
                stack.pop()
                continue
            node = prompt.get(node_id)
            inputs = node.get("inputs", {}) if isinstance(node, dict) else None
            if not isinstance(inputs, dict) or not isinstance(node.get("class_type"), str):
                raise NotCacheable("malformed")
            pending = [v[0] for v in inputs.values() if _is_link(v) and v[0] not in hashes]
            if pending:
                if node_id in entered:
                    raise NotCacheable("malformed")  # its inputs came back to it: a cycle
                entered.add(node_id)
                for upstream in pending:
                    if upstream not in prompt or upstream in entered:
                        raise NotCacheable("malformed")
                    stack.append(upstream)
                continue
            canonical = {}
            for name, value in inputs.items():
                if name == CACHE_SCOPE_INPUT:
                    continue  # the proxy's own (isolation.py): never part of what the user asked
                if _is_link(value):
                    canonical[name] = ["L", hashes[value[0]], value[1]]
                elif (node_id, name) in file_hashes:
                    canonical[name] = ["F", value, file_hashes[(node_id, name)]]
                else:
                    canonical[name] = ["V", value]
            hashes[node_id] = _sha(_canonical([node["class_type"], canonical]))
            entered.discard(node_id)
            stack.pop()
    return hashes


@dataclass(frozen=True)
class CachePlan:
    """A cacheable request: its key without the environment (what identical requests in
    flight share), its scope, and its node ids' hashes (to map outputs both ways)."""
    key: str
    scope: str
    nodes: dict = field(hash=False)

    def as_payload(self) -> dict:
        return {"key": self.key, "scope": self.scope, "nodes": self.nodes}

    @classmethod
    def from_payload(cls, data) -> "CachePlan | None":
        if not isinstance(data, dict) or not isinstance(data.get("key"), str) or \
                not isinstance(data.get("nodes"), dict):
            return None
        return cls(data["key"], str(data.get("scope", "")), data["nodes"])


def prompt_plan(prompt: dict, *, scope: str, file_hashes: dict, targets: list | None) -> CachePlan:
    """The canonical key of a prompt (as its user wrote it) in ``scope``."""
    nodes = node_hashes(prompt, file_hashes)
    if targets is None:
        selection = None  # every output node
    else:
        if any(t not in nodes for t in targets):
            raise NotCacheable("malformed")
        selection = sorted({nodes[t] for t in targets})
    key = _sha(_canonical([KEY_VERSION, scope, sorted(nodes.values()), selection]))
    return CachePlan(key, scope, nodes)


def entry_key(request_key: str, fingerprint: str) -> str:
    """The key of a result made in one environment (a backend's fingerprint)."""
    return _sha(f"{request_key}\0{fingerprint}")


def output_items(outputs: dict):
    """(node, kind, index in kind, item) of every file named in ComfyUI UI outputs, in the
    order api/outputs.py lists them."""
    for node_id, output in (outputs or {}).items():
        for kind, items in (output or {}).items() if isinstance(output, dict) else ():
            for i, item in enumerate(items if isinstance(items, list) else []):
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    yield node_id, kind, i, item


def cached_files(job: Job) -> list[dict]:
    """A hit job's files, as api/outputs.listed_files lists them, with their content hash."""
    return [{"node": node, "kind": kind, "filename": item["filename"], "subfolder": item.get("subfolder", ""),
             "type": item.get("type", "output"), "sha256": item.get("sha256", ""),
             "content_type": item.get("content_type") or "application/octet-stream"}
            for node, kind, _, item in output_items(job.outputs)]


class TooLarge(Exception):
    pass


class BlobStore:
    """Content-addressed files (``<root>/<sha[:2]>/<sha>``), written and read off the IOLoop."""

    def __init__(self, root: str | None):
        self._temporary = None
        if not root:
            self._temporary = tempfile.TemporaryDirectory(prefix="comfy-ws-proxy-cache-", ignore_cleanup_errors=True)
            root = self._temporary.name
        self.root = root

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()

    def path(self, sha: str) -> str:
        return os.path.join(self.root, sha[:2], sha)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def exists(self, sha: str) -> bool:
        return os.path.exists(self.path(sha))

    def remove(self, shas: Iterable[str]) -> None:
        for sha in shas:
            try:
                os.remove(self.path(sha))
            except FileNotFoundError:
                pass

    def new_partial(self):
        os.makedirs(self.root, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=self.root, prefix=".partial-", delete=False)

    @staticmethod
    def _finish(partial, sha: str, path: str) -> None:
        partial.flush()
        os.fsync(partial.fileno())
        partial.close()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(partial.name, path)  # never half a file under its final name

    @staticmethod
    def _drop(partial) -> None:
        partial.close()
        try:
            os.remove(partial.name)
        except FileNotFoundError:
            pass

    async def store_from(self, backend, filename: str, subfolder: str, kind: str, limit: int) -> tuple[str, int, str]:
        """Copy one file from the backend's /view into the store, streamed (one chunk in memory)
        and bounded: (sha256, size, content type). Raises TooLarge, or ComfyUnavailable when
        it does not come whole."""
        partial = await self.run(self.new_partial)
        digest = hashlib.sha256()
        size = 0
        content_type = ""
        pending: list[bytes] = []

        def on_headers(status: int, headers) -> None:
            nonlocal content_type
            content_type = headers.get("Content-Type", "") if status == 200 else ""

        async def on_chunk(chunk: bytes) -> bool:
            nonlocal size
            size += len(chunk)
            if size > limit:
                return False
            digest.update(chunk)
            pending.append(chunk)
            if sum(map(len, pending)) >= CHUNK:
                data = b"".join(pending)
                pending.clear()
                await self.run(partial.write, data)
            return True

        try:
            status, complete = await backend.stream_view(filename, subfolder, kind, {}, on_headers, on_chunk)
            if size > limit:
                raise TooLarge(filename)
            if status != 200 or not complete:
                raise ComfyUnavailable(f"view {status}")
            if pending:
                await self.run(partial.write, b"".join(pending))
            sha = digest.hexdigest()
            await self.run(self._finish, partial, sha, self.path(sha))
        except BaseException:
            await self.run(self._drop, partial)
            raise
        return sha, size, content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"


class InputHasher:
    """The content hash of a file that only the backend has (an input placed there, an
    earlier output used as input): fetched through /view, streamed and bounded, remembered
    with its ETag and revalidated with If-None-Match (a 304 costs no bytes)."""

    MEMO = 1024

    def __init__(self, limit: int):
        self.limit = limit
        self._memo: OrderedDict[tuple, tuple[str, str]] = OrderedDict()  # (backend, kind, sub, name) -> (etag, sha)

    async def sha256(self, backend, kind: str, subfolder: str, filename: str) -> str:
        memo_key = (backend.name, kind, subfolder, filename)
        known = self._memo.get(memo_key)
        digest = hashlib.sha256()
        size = 0
        seen = {"status": 0, "etag": ""}

        def on_headers(status: int, headers) -> None:
            seen["status"] = status
            seen["etag"] = headers.get("ETag", "")

        async def on_chunk(chunk: bytes) -> bool:
            nonlocal size
            size += len(chunk)
            if size > self.limit:
                return False
            digest.update(chunk)  # (a chunk: well under a millisecond of CPU)
            return True

        asked = {"If-None-Match": known[0]} if known and known[0] else {}
        status, complete = await backend.stream_view(filename, subfolder, kind, asked, on_headers, on_chunk)
        if status == 304 and known is not None:
            self._memo.move_to_end(memo_key)
            return known[1]
        if size > self.limit:
            raise NotCacheable("input_too_large")
        if status != 200 or not complete:
            raise NotCacheable("input_file")
        sha = digest.hexdigest()
        self._memo[memo_key] = (seen["etag"], sha)
        if len(self._memo) > self.MEMO:
            self._memo.popitem(last=False)
        return sha


def _view_location(located: str) -> tuple[str, str, str]:
    """``sub/name.png [output]`` -> (type, subfolder, filename), as ComfyUI's /view reads it."""
    kind = "input"
    for suffix, folder in ANNOTATIONS.items():
        if located.endswith(suffix):
            located, kind = located[:-len(suffix)].rstrip(" "), folder
    subfolder, _, filename = located.rpartition("/")
    return kind, subfolder, filename


@dataclass
class Flight:
    """Identical requests in flight: one runs (the leader), the others wait for its result."""
    leader: str
    followers: list[str] = field(default_factory=list)


class ResultCache:
    """The cache's index (in memory, durable in the store), its files (BlobStore), the
    requests in flight, and the expiry/eviction timer."""

    def __init__(self, tracker: JobTracker, pool: BackendPool, blobs: BlobStore, metrics: Metrics, settings, *,
                 fingerprints: Callable[[], list[str]], fingerprint_of: Callable[[str], str | None],
                 learn: Callable[[], Awaitable[None]] | None = None, folder_of: Callable[[str], str] | None = None,
                 upload_exists: Callable[[str, str], bool] | None = None):
        self.tracker = tracker
        self.store = tracker.store
        self.pool = pool
        self.blobs = blobs
        self.metrics = metrics
        self.wall = tracker.wall
        self.fingerprints = fingerprints
        self.fingerprint_of = fingerprint_of
        self.learn = learn
        self.folder_of = folder_of  # owner -> their folder (ISOLATE_USERS), or None
        self.upload_exists = upload_exists  # (folder, name) -> kept by the upload store?
        self.shared = settings.cache_shared
        self.ttl = settings.cache_ttl_s
        self.max_entries = settings.cache_max_entries
        self.max_bytes = settings.cache_max_bytes
        self.max_entry_bytes = settings.cache_max_entry_bytes
        self.uncacheable = DEFAULT_UNCACHEABLE_NODES | frozenset(settings.cache_uncacheable_nodes)
        extra = {tuple(item.partition(".")[::2]) for item in settings.file_inputs}
        self.file_inputs = BUILTIN_FILE_INPUTS | extra
        self.hasher = InputHasher(settings.cache_max_input_bytes)
        self.entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently used first
        self.total_bytes = 0
        self.flights: dict[str, Flight] = {}
        self.kick: Callable[[], None] | None = None  # the queue's kick (set by the wiring)
        self._storing: Counter = Counter()  # files copied for entries not yet indexed
        self.plans: dict[str, CachePlan] = {}  # unfinished job id -> its plan
        self._tasks: set[asyncio.Future] = set()
        self._timer = PeriodicCallback(self.cleanup, settings.cleanup_interval_ms)
        try:
            for entry in self.store.cache_entries():
                self._index(entry)
        except StoreError as e:
            log.error("the result cache's index could not be read (%s): starting empty", e)
        self._gauges()
        tracker.listeners.append(self._job_changed)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """After a restart: jobs that waited for an identical one are answered, or run."""
        self._timer.start()
        waiting = []
        for job in sorted(self.tracker.unfinished(), key=lambda j: j.order):
            plan = CachePlan.from_payload((job.payload or {}).get("cache"))
            if plan is None:
                if job.state == JobState.WAITING:
                    self._release(job)  # (cannot happen unless the row was edited: run it)
                continue
            self.plans[job.job_id] = plan
            if job.state == JobState.WAITING:
                waiting.append(job)
            elif plan.key not in self.flights:
                self.flights[plan.key] = Flight(job.job_id)
        for job in waiting:
            plan = self.plans[job.job_id]
            entry = self.entry_for(plan)
            if entry is not None:
                self._answer_follower(job, entry)
            elif plan.key in self.flights:
                self.flights[plan.key].followers.append(job.job_id)
            else:
                self.flights[plan.key] = Flight(job.job_id)
                self._release(job)

    async def idle(self) -> None:
        """Return once nothing is being copied into (or dropped from) the cache."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def stop(self) -> None:
        self._timer.stop()

    async def close(self, grace: float) -> None:
        """Let the copies in progress finish (within ``grace`` seconds), then drop the rest."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self.blobs.close()

    # --- planning: is this request cacheable, and what is its key? --------------------------------
    async def plan(self, owner: str, request: SubmitRequest, confined: dict) -> CachePlan | None:
        """The request's plan, or None when it runs without the cache (opted out, impure
        nodes, an unknown environment, a file that cannot be hashed...)."""
        try:
            if request.no_cache:
                raise NotCacheable("opted_out")
            if any(request.extra_data and request.extra_data.get(k) for k in CREDENTIAL_KEYS):
                raise NotCacheable("credentials")
            for node in request.prompt.values():
                if node.get("class_type") in self.uncacheable:
                    raise NotCacheable("impure_node")
            if not self.fingerprints() and self.learn is not None:
                await self.learn()
            if not self.fingerprints():
                raise NotCacheable("no_environment")
            refs = file_refs(request.prompt, confined, self.file_inputs)
            hashes: dict = {}
            for ref in refs:
                sha = await self._file_hash(ref)
                if ref.member is None:
                    hashes[(ref.node_id, ref.input_name)] = sha
                else:
                    hashes.setdefault((ref.node_id, ref.input_name), {})[ref.member] = sha
            scope = SHARED_SCOPE if self.shared else "u:" + owner
            plan = prompt_plan(request.prompt, scope=scope, file_hashes=hashes,
                               targets=request.partial_execution_targets)
        except NotCacheable as e:
            self.metrics.cache_requests.labels("bypass").inc()
            log.debug("not cached user=%s reason=%s", owner, e.reason)
            return None
        entry = self.entry_for(plan)
        if entry is not None and not await self.blobs.run(self._files_present, entry):
            log.warning("a cache entry's files are gone from CACHE_DIR: forgetting it")
            self._unindex(entry)
            await self._forget([entry])
        return plan

    def _files_present(self, entry: CacheEntry) -> bool:
        return all(self.blobs.exists(item.get("sha256", "")) for _, _, _, item in output_items(entry.outputs))

    async def _file_hash(self, ref: FileRef) -> str:
        kind, subfolder, filename = _view_location(ref.located)
        upload = UPLOAD_NAME.match(ref.located)
        if upload is not None and kind == "input" and self.upload_exists is not None \
                and await self.blobs.run(self.upload_exists, upload.group(1) or "", filename):
            return upload.group(2)  # the upload store names a file by its sha256 (jobs/uploads.py)
        backend = self.pool.default
        try:
            return await self.hasher.sha256(backend, kind, subfolder, filename)
        except (ComfyUnavailable, ComfyRejected):
            raise NotCacheable("input_file") from None

    # --- admission: hit, follow, or lead ----------------------------------------------------------
    def entry_for(self, plan: CachePlan) -> CacheEntry | None:
        now = self.wall()
        for fingerprint in self.fingerprints():
            entry = self.entries.get(entry_key(plan.key, fingerprint))
            if entry is not None and entry.expires_at > now and entry.scope == plan.scope:
                return entry
        return None

    def admit(self, job: Job, plan: CachePlan) -> str:
        """Decide a new job's way (nothing awaited in between, so identical requests arriving
        together see each other): "hit" (its outputs filled in, to be finished at once), "follow" (waiting
        for the identical job in flight) or "lead" (it runs)."""
        job.payload = {**(job.payload or {}), "cache": plan.as_payload()}
        entry = self.entry_for(plan)
        if entry is not None:  # recorded waiting, then finished at once (tracker.move: webhooks, waiters)
            self._fill(job, entry, plan)
            job.state = JobState.WAITING
            self._used(entry)
            self.metrics.cache_requests.labels("hit").inc()
            return "hit"
        self.plans[job.job_id] = plan
        flight = self.flights.get(plan.key)
        if flight is not None:
            flight.followers.append(job.job_id)
            job.state = JobState.WAITING
            self.metrics.cache_requests.labels("shared").inc()
            return "follow"
        self.flights[plan.key] = Flight(job.job_id)
        self.metrics.cache_requests.labels("miss").inc()
        return "lead"

    def _fill(self, job: Job, entry: CacheEntry, plan: CachePlan) -> None:
        """The entry's outputs on the job's own node ids, in the job owner's folder."""
        folder = self.folder_of(job.owner) if self.folder_of is not None else None
        outputs = {}
        for node_id, node_hash in plan.nodes.items():
            output = entry.outputs.get(node_hash)
            if output is None:
                continue
            mine = json.loads(json.dumps(output))
            for _, _, _, item in output_items({node_id: mine}):
                relative = item.get("subfolder", "")
                if folder is not None and item.get("type") != "temp":
                    item["subfolder"] = f"{folder}/{relative}" if relative else folder
            outputs[node_id] = mine
        job.outputs = outputs
        job.cached = True
        job.result = {"prompt_id": job.job_id, "cached": True}

    def _used(self, entry: CacheEntry) -> None:
        entry.used_at = self.wall()
        self.entries.move_to_end(entry.key)
        try:
            self.store.cache_used(entry.key, entry.used_at)
        except StoreError as e:
            log.warning("the result cache could not record a use (%s)", e)

    # --- a job's end --------------------------------------------------------------------------------
    def _job_changed(self, job: Job, old: str) -> None:
        if not job.finished or old not in JobState.UNFINISHED:
            return
        plan = self.plans.pop(job.job_id, None)
        if plan is None:
            return
        flight = self.flights.get(plan.key)
        if flight is None:
            return
        if job.job_id in flight.followers:  # a follower cancelled while it waited
            flight.followers.remove(job.job_id)
            return
        if flight.leader != job.job_id:
            return
        if job.state == JobState.SUCCESS and not job.cached:
            task = asyncio.ensure_future(self._keep_result(job, plan, flight))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._hand_on(flight, plan.key)

    def _hand_on(self, flight: Flight, key: str) -> None:
        """The leader did not succeed: the first follower runs in its place."""
        while flight.followers:
            job = self.tracker.get(flight.followers.pop(0))
            if job is not None and job.state == JobState.WAITING:
                flight.leader = job.job_id
                self._release(job)
                return
        self.flights.pop(key, None)

    def _release(self, job: Job) -> None:
        self.tracker.move(job, JobState.QUEUED)
        self._kick()

    def _kick(self) -> None:
        if self.kick is not None:
            self.kick()

    async def _keep_result(self, job: Job, plan: CachePlan, flight: Flight) -> None:
        """Copy a leader's outputs into the cache, then answer its followers from it."""
        entry = None
        try:
            entry = await self._store_outputs(job, plan)
        except Exception:  # noqa: BLE001 - a result not kept must never stop its followers
            log.exception("storing a result in the cache failed user=%s prompt=%s", job.owner, job.job_id)
        self.flights.pop(plan.key, None)
        for job_id in flight.followers:
            follower = self.tracker.get(job_id)
            if follower is None or follower.state != JobState.WAITING:
                continue
            if entry is not None:
                self._answer_follower(follower, entry)
            else:
                self.plans.pop(job_id, None)  # it runs on its own, as if the cache were off
                self._release(follower)

    async def _store_outputs(self, job: Job, plan: CachePlan) -> CacheEntry | None:
        copied: list[str] = []  # files of this entry, kept from the sweeps until it is indexed
        try:
            return await self._copy_outputs(job, plan, copied)
        finally:
            self._storing.subtract(copied)
            self._storing += Counter()  # (drops the zeros)

    async def _copy_outputs(self, job: Job, plan: CachePlan, copied: list[str]) -> CacheEntry | None:
        fingerprint = self.fingerprint_of(job.backend)
        if fingerprint is None and self.learn is not None:  # (not learned yet since a restart)
            await self.learn()
            fingerprint = self.fingerprint_of(job.backend)
        backend = self.pool.get(job.backend)
        if fingerprint is None or backend is None:
            return None
        outputs = dict(job.outputs)
        try:  # cached nodes' outputs are only in ComfyUI's history
            history = await backend.history(job.job_id)
            outputs.update((history.get(job.job_id) or {}).get("outputs") or {})
        except (ComfyUnavailable, ComfyRejected):
            pass
        folder = self.folder_of(job.owner) if self.folder_of is not None else None
        kept: dict[str, dict] = {}
        total = 0
        for node_id, output in outputs.items():
            node_hash = plan.nodes.get(node_id)
            if node_hash is None or not isinstance(output, dict):
                continue
            copy = json.loads(json.dumps(output))
            for _, _, _, item in output_items({node_id: copy}):
                subfolder, kind = item.get("subfolder", ""), item.get("type", "output")
                if folder is not None and kind != "temp":
                    if not (subfolder == folder or subfolder.startswith(folder + "/")):
                        return None  # not the owner's file: never copied
                    subfolder_rel = subfolder[len(folder) + 1:]
                else:
                    subfolder_rel = subfolder
                try:
                    sha, size, content_type = await self.blobs.store_from(
                        backend, item["filename"], subfolder, kind, self.max_entry_bytes - total)
                except TooLarge:
                    log.info("result not cached (over CACHE_MAX_ENTRY_BYTES) user=%s prompt=%s", job.owner,
                             job.job_id)
                    return None
                except ComfyUnavailable:
                    return None
                copied.append(sha)
                self._storing[sha] += 1
                total += size
                item.update({"subfolder": subfolder_rel, "sha256": sha, "size": size, "content_type": content_type})
            kept[node_hash] = copy
        now = self.wall()
        entry = CacheEntry(entry_key(plan.key, fingerprint), plan.scope, kept, total, now, now + self.ttl, now)
        try:
            self.store.cache_put(entry)
        except StoreError as e:
            log.error("the result cache could not record an entry (%s)", e)
            return None
        old = self.entries.get(entry.key)
        if old is not None:
            self._unindex(old)
        self._index(entry)
        self.metrics.cache_stored_bytes.inc(total)
        await self._enforce_bounds()
        return self.entries.get(entry.key)

    def _answer_follower(self, job: Job, entry: CacheEntry) -> None:
        plan = self.plans.pop(job.job_id, None) or CachePlan.from_payload((job.payload or {}).get("cache"))
        if plan is None:
            return self._release(job)
        self._fill(job, entry, plan)
        self._used(entry)
        self.metrics.cache_requests.labels("hit").inc()
        outputs, result = job.outputs, job.result
        self.tracker.move(job, JobState.SUCCESS, outputs=outputs, result=result, cached=True,
                          outcome_unknown=False)
        self.tracker.announce_cached(job)

    # --- the index, its bounds and expiry ---------------------------------------------------------
    def _index(self, entry: CacheEntry) -> None:
        self.entries[entry.key] = entry
        self.total_bytes += entry.bytes

    def _unindex(self, entry: CacheEntry) -> None:
        if self.entries.pop(entry.key, None) is not None:
            self.total_bytes -= entry.bytes

    def _gauges(self) -> None:
        self.metrics.cache_entries.set(len(self.entries))
        self.metrics.cache_bytes.set(self.total_bytes)

    async def _enforce_bounds(self) -> None:
        gone = []
        while self.entries and (len(self.entries) > self.max_entries or self.total_bytes > self.max_bytes):
            entry = next(iter(self.entries.values()))  # least recently used
            self._unindex(entry)
            gone.append(entry)
        if gone:
            self.metrics.cache_evictions.labels("bounds").inc(len(gone))
        await self._forget(gone)

    def cleanup(self) -> None:
        """Expire entries, then sweep files nothing names (the cleanup timer)."""
        async def both() -> None:
            await self.expire()
            await self.collect_garbage()
        task = asyncio.ensure_future(both())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def expire(self) -> int:
        now = self.wall()
        gone = [e for e in self.entries.values() if e.expires_at <= now]
        for entry in gone:
            self._unindex(entry)
        if gone:
            self.metrics.cache_evictions.labels("expired").inc(len(gone))
        await self._forget(gone)
        return len(gone)

    def referenced(self) -> set[str]:
        """The files still named: by an entry, or by a job the proxy still remembers (its
        downloads must keep working whatever happens to the entry it came from)."""
        shas = {item.get("sha256") for e in self.entries.values() for _, _, _, item in output_items(e.outputs)}
        shas.update(self._storing)
        for job in list(self.tracker.jobs.values()):
            if job.cached:
                shas.update(item.get("sha256") for _, _, _, item in output_items(job.outputs))
        return shas

    async def _forget(self, gone: list[CacheEntry]) -> None:
        """Drop entries from the store, then their files that nothing names any more."""
        self._gauges()
        if not gone:
            return
        try:
            self.store.cache_delete([e.key for e in gone])
        except StoreError as e:
            log.error("the result cache could not forget entries (%s): they go at the next cleanup", e)
            for entry in gone:
                self._index(entry)
            self._gauges()
            return
        named = self.referenced()
        orphans = {item.get("sha256") for e in gone for _, _, _, item in output_items(e.outputs)} - named
        orphans.discard(None)
        if orphans:
            await self.blobs.run(self.blobs.remove, orphans)

    async def collect_garbage(self) -> int:
        """Remove files no entry and no remembered job names (after jobs are forgotten)."""
        named = self.referenced()

        def sweep() -> int:
            removed = 0
            for folder in os.listdir(self.blobs.root) if os.path.isdir(self.blobs.root) else ():
                path = os.path.join(self.blobs.root, folder)
                if len(folder) != 2 or not os.path.isdir(path):
                    continue
                for name in os.listdir(path):
                    if name not in named:
                        os.remove(os.path.join(path, name))
                        removed += 1
            return removed
        return await self.blobs.run(sweep)
