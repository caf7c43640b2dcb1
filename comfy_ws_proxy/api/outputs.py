"""/outputs: a user's own job's output files, from the backend that ran it."""
from __future__ import annotations

from ..backends.backend import ComfyRejected, ComfyUnavailable
from ..backends.pool import BackendPool
from ..jobs.service import JobService
from ..model import RequestError
from .base import UserHandler


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


class OutputsHandler(UserHandler):
    """GET /outputs/{prompt_id}: the caller's own job's output files;
    GET /outputs/{prompt_id}/view?filename=&subfolder=&type=: one of those files, streamed
    from the backend that ran the job.

    ComfyUI's /view has no ownership check and predictable names (PROTOCOL.md 5): the proxy
    serves only files listed in the outputs of a job the caller owns: those it heard (kept
    with the job) and those in ComfyUI's history of it (cached nodes' outputs are only there).
    """

    def initialize(self, verifier, metrics, service: JobService, pool: BackendPool):
        super().initialize(verifier, metrics)
        self.service = service
        self.pool = pool

    async def _owned_outputs(self, prompt_id: str):
        try:
            job = self.service.get(self.identity.user_id, prompt_id)
        except RequestError:
            self.write_json_error(404, "not_found", "No such prompt")
            return None, None
        backend = self.pool.get(job.backend)
        outputs = dict(job.outputs)
        if backend is not None:
            try:
                history = await backend.history(prompt_id)
                outputs.update((history.get(prompt_id) or {}).get("outputs") or {})
            except (ComfyUnavailable, ComfyRejected):
                if not outputs:
                    self.write_json_error(503, "comfy_unavailable", "ComfyUI is temporarily unavailable")
                    return None, None
        return backend, listed_files(outputs)

    async def get(self, prompt_id: str, view: str | None = None):
        backend, files = await self._owned_outputs(prompt_id)
        if files is None:
            return
        if not view:
            return self.write_json({"prompt_id": prompt_id, "files": files})
        wanted = (self.get_query_argument("filename", ""), self.get_query_argument("subfolder", ""),
                  self.get_query_argument("type", "output"))
        if backend is None or wanted not in {(f["filename"], f["subfolder"], f["type"]) for f in files}:
            return self.write_json_error(404, "not_found", "No such output")
        self.clear_header("Content-Type")
        self.set_header("X-Content-Type-Options", "nosniff")  # before the first chunk flushes the headers
        started = False

        def on_headers(line: str) -> None:
            if not started and line.lower().startswith("content-type:"):
                self.set_header("Content-Type", line.split(":", 1)[1].strip())

        def on_chunk(chunk: bytes) -> None:
            nonlocal started
            started = True
            self.write(chunk)
            self.flush()

        status = await backend.stream_view(*wanted, on_headers=on_headers, on_chunk=on_chunk)
        if status != 200 and not started:
            self.set_header("Content-Type", "application/json")
            return self.write_json_error(404, "not_found", "Output not available")
        self.finish()
