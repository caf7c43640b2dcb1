"""/outputs: a user's own job's output files, from the backend that ran it."""
from __future__ import annotations

import asyncio
import os

from tornado.iostream import StreamClosedError

from ..backends.backend import ComfyRejected, ComfyUnavailable
from ..backends.pool import BackendPool
from ..jobs.cache import cached_files
from ..jobs.isolation import UserIsolation
from ..jobs.service import JobService
from ..model import RequestError
from .base import UserHandler

# ComfyUI's headers of a file that are passed on; the rest (its server, its CORS) are not ours.
PASSED_HEADERS = ("Content-Type", "Content-Length", "Content-Disposition", "ETag", "Last-Modified", "Accept-Ranges",
                  "Content-Range")
# The client's headers passed to ComfyUI: its aiohttp does ranges and revalidation itself.
ASKED_HEADERS = ("Range", "If-Range", "If-None-Match", "If-Modified-Since")
# What is answered as ComfyUI answered it; anything else is "not available".
PASSED_STATUSES = (200, 206, 304, 416)


def listed_files(outputs: dict) -> list[dict]:
    """The files named in a job's outputs ({node: {"images": [{filename, subfolder, type}]}})."""
    files = []
    for node_id, output in (outputs or {}).items():
        for kind, items in (output or {}).items() if isinstance(output, dict) else ():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    files.append({"node": node_id, "kind": kind, "filename": item["filename"],
                                  "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")})
    return files


async def job_files(job, pool: BackendPool, isolation: UserIsolation | None):
    """The backend that ran the job and the files of its outputs the owner may have: those
    heard (kept with the job) and those in ComfyUI's history of it (cached nodes' outputs
    are only there). Raises ComfyUnavailable when nothing is known without ComfyUI."""
    backend = pool.get(job.backend)
    outputs = dict(job.outputs)
    if backend is not None:
        try:
            history = await backend.history(job.job_id)
            outputs.update((history.get(job.job_id) or {}).get("outputs") or {})
        except (ComfyUnavailable, ComfyRejected):
            if not outputs:
                raise ComfyUnavailable("history") from None

    def mine(file: dict) -> bool:
        if isolation is None or file["type"] == "temp":
            return True  # temp files are listed only for the job that wrote them
        return isolation.owns(job.owner, file["subfolder"])

    return backend, [f for f in listed_files(outputs) if mine(f)]


class DownloadSlots:
    """Downloads in progress per user (MAX_DOWNLOADS_PER_USER): each holds a connection to
    ComfyUI and a chunk of memory until its client has read it."""

    def __init__(self, per_user: int):
        self.per_user = per_user
        self.active: dict[str, int] = {}

    def take(self, owner: str) -> bool:
        if self.active.get(owner, 0) >= self.per_user:
            return False
        self.active[owner] = self.active.get(owner, 0) + 1
        return True

    def give_back(self, owner: str) -> None:
        left = self.active[owner] - 1
        if left:
            self.active[owner] = left
        else:
            del self.active[owner]


class FileDownload(UserHandler):
    """Streams one file from a backend to the client: at most MAX_DOWNLOADS_PER_USER at once
    per user, one chunk in memory each, ended when the client stops reading."""

    def initialize(self, verifier, metrics, downloads: DownloadSlots, stall_timeout: float, **kwargs):
        super().initialize(verifier, metrics)
        self.downloads = downloads
        self.stall_timeout = stall_timeout

    async def download(self, backend, filename: str, subfolder: str, kind: str) -> None:
        await self._in_a_slot(lambda: self._stream(backend, filename, subfolder, kind))

    async def _in_a_slot(self, send) -> None:
        """``await send()`` holding one of the owner's download slots (MAX_DOWNLOADS_PER_USER),
        or a 429 when they hold every one."""
        owner = self.identity.user_id
        if not self.downloads.take(owner):
            self.set_header("Retry-After", "1")
            return self.write_json_error(429, "too_many_downloads",
                                         f"At most {self.downloads.per_user} downloads at once per user")
        try:
            await send()
        finally:
            self.downloads.give_back(owner)

    async def _stream(self, backend, filename: str, subfolder: str, kind: str) -> None:
        started = False
        cut = False
        status_seen = 0

        def on_headers(status: int, headers) -> None:
            nonlocal status_seen
            status_seen = status
            if status not in PASSED_STATUSES:
                return
            self.clear_header("Content-Type")
            self.set_header("X-Content-Type-Options", "nosniff")  # before the first chunk flushes the headers
            self.set_status(status)
            for name in PASSED_HEADERS:
                if name in headers:
                    self.set_header(name, headers[name])

        async def on_chunk(chunk: bytes) -> bool:
            # One chunk in flight per download: the next is read from ComfyUI only when the
            # client has taken this one, or the download ends if it stops reading.
            nonlocal started, cut
            started = True
            self.write(chunk)
            try:
                await asyncio.wait_for(self.flush(), self.stall_timeout)
                return True
            except (StreamClosedError, asyncio.TimeoutError):
                cut = True
                return False

        asked = {name: self.request.headers[name] for name in ASKED_HEADERS if name in self.request.headers}
        status, complete = await backend.stream_view(filename, subfolder, kind, asked, on_headers, on_chunk)
        if not started and status not in PASSED_STATUSES:
            self.set_status(200)
            self.set_header("Content-Type", "application/json")
            for name in PASSED_HEADERS:
                self.clear_header(name)
            if status == 0:
                return self.write_json_error(503, "comfy_unavailable", "ComfyUI is temporarily unavailable")
            return self.write_json_error(404, "not_found", "Output not available")
        if cut or not complete:
            self.request.connection.close()  # a body cut short must not look complete
            return
        if status in (304, 416):
            self.clear_header("Content-Length")
        self.finish()


    async def serve_copy(self, blobs, file: dict) -> None:
        """One of a cached job's files (jobs/cache.py), from the proxy's own copy, with the
        headers a download from ComfyUI has: Content-Type, ETag (the content hash), 304, one
        byte range (206, 416); read off the IOLoop one chunk at a time."""
        await self._in_a_slot(lambda: self._send_copy(blobs, file))

    async def _send_copy(self, blobs, file: dict) -> None:
        sha = file.get("sha256") or ""
        try:
            handle = await blobs.run(open, blobs.path(sha), "rb")
        except OSError:
            return self.write_json_error(404, "not_found", "Output not available")
        try:
            size = os.fstat(handle.fileno()).st_size
            etag = f'"{sha[:32]}"'
            name = "".join(c for c in file["filename"] if c.isprintable() and c not in '"\\')
            self.set_header("Content-Type", file.get("content_type") or "application/octet-stream")
            self.set_header("X-Content-Type-Options", "nosniff")
            self.set_header("Content-Disposition", f'filename="{name}"')
            self.set_header("ETag", etag)
            self.set_header("Accept-Ranges", "bytes")
            asked = self.request.headers.get("If-None-Match")
            if asked is not None and (asked.strip() == "*" or etag in (t.strip() for t in asked.split(","))):
                self.set_status(304)
                return self.finish()
            first, last = 0, size - 1
            wanted = byte_range(self.request.headers.get("Range"), size)
            if_range = self.request.headers.get("If-Range")
            if wanted is not None and (if_range is None or if_range.strip() == etag):
                if wanted == "unsatisfiable":
                    self.set_status(416)
                    self.set_header("Content-Range", f"bytes */{size}")
                    return self.finish()
                first, last = wanted
                self.set_status(206)
                self.set_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.set_header("Content-Length", str(last - first + 1))
            await blobs.run(handle.seek, first)
            left = last - first + 1
            while left > 0:
                chunk = await blobs.run(handle.read, min(COPY_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                self.write(chunk)
                try:
                    await asyncio.wait_for(self.flush(), self.stall_timeout)
                except (StreamClosedError, asyncio.TimeoutError):
                    left = -1
                    break
            if left != 0:
                self.request.connection.close()  # a body cut short must not look complete
                return
            self.finish()
        finally:
            handle.close()


COPY_CHUNK = 64 * 1024


def byte_range(header: str | None, size: int):
    """One ``bytes=first-last`` / ``bytes=first-`` / ``bytes=-suffix`` range of a file of
    ``size`` bytes: (first, last), "unsatisfiable", or None (no range, or one not understood:
    the whole file, as RFC 9110 allows)."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[6:].strip().partition("-")
    if not sep:
        return None
    try:
        if not first:
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return max(0, size - suffix), size - 1
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "unsatisfiable"
    return start, end


class OutputsHandler(FileDownload):
    """GET /outputs/{prompt_id}: the caller's own job's output files;
    GET /outputs/{prompt_id}/view?filename=&subfolder=&type=: one of those files, streamed
    from the backend that ran the job.

    ComfyUI's /view has no ownership check and predictable names (PROTOCOL.md 5): the proxy
    serves only files listed in the outputs of a job the caller owns: those it heard (kept
    with the job) and those in ComfyUI's history of it (cached nodes' outputs are only there);
    with ISOLATE_USERS, an output or input file only from the caller's own folder.
    """

    def initialize(self, verifier, metrics, service: JobService, pool: BackendPool,
                   isolation: UserIsolation | None, downloads: DownloadSlots, stall_timeout: float, cache=None):
        super().initialize(verifier, metrics, downloads, stall_timeout)
        self.cache = cache
        self.service = service
        self.pool = pool
        self.isolation = isolation

    async def _owned_outputs(self, prompt_id: str):
        try:
            job = self.service.get(self.identity.user_id, prompt_id)
        except RequestError:
            self.write_json_error(404, "not_found", "No such prompt")
            return None, None
        if job.cached:  # the proxy's own copies (jobs/cache.py)
            return None, cached_files(job)
        try:
            backend, files = await job_files(job, self.pool, self.isolation)
        except ComfyUnavailable:
            self.write_json_error(503, "comfy_unavailable", "ComfyUI is temporarily unavailable")
            return None, None
        return backend, files

    async def get(self, prompt_id: str, view: str | None = None):
        backend, files = await self._owned_outputs(prompt_id)
        if files is None:
            return
        if not view:
            return self.write_json({"prompt_id": prompt_id, "files": [
                {k: f[k] for k in ("node", "kind", "filename", "subfolder", "type")} for f in files]})
        wanted = (self.get_query_argument("filename", ""), self.get_query_argument("subfolder", ""),
                  self.get_query_argument("type", "output"))
        copy = next((f for f in files if "sha256" in f and (f["filename"], f["subfolder"], f["type"]) == wanted), None)
        if copy is not None and self.cache is not None:
            return await self.serve_copy(self.cache.blobs, copy)
        if backend is None or wanted not in {(f["filename"], f["subfolder"], f["type"]) for f in files}:
            return self.write_json_error(404, "not_found", "No such output")
        await self.download(backend, *wanted)

