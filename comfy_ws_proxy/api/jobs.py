"""The jobs REST API: the same users and the same jobs as /ws, over plain HTTP.

``POST /generate`` (alias ``POST /jobs``) submits, ``GET /job/{id}`` (``/jobs/{id}``) polls,
``GET /jobs`` lists the caller's jobs, ``POST /job/{id}/cancel`` cancels, and
``GET /job/{id}/image/{node}/{index}`` downloads an output. Another user's job answers
exactly like an unknown one. ``Prefer: wait=N`` waits for the end; ``Idempotency-Key`` makes a
retried POST safe (draft-ietf-httpapi-idempotency-key-header).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import mimetypes
from datetime import datetime, timezone
from typing import Any

from ..backends.backend import ComfyUnavailable
from ..jobs.cache import cached_files
from ..jobs.isolation import UserIsolation
from ..jobs.service import JobService
from ..jobs.submission import parse_submit
from ..model import API_STATUS, ErrorCode, IdempotentAnswer, Job, JobState, RequestError
from .base import UserHandler
from .outputs import FileDownload, job_files, listed_files

STATUS = API_STATUS
STATUSES = frozenset(STATUS.values())
CANCELLED = frozenset({JobState.CANCELLED, JobState.INTERRUPTED})

# A RequestError's code as an HTTP status.
HTTP_STATUS = {ErrorCode.INVALID_MESSAGE: 400, ErrorCode.INVALID_PROMPT: 422, ErrorCode.MESSAGE_TOO_LARGE: 413,
               ErrorCode.RATE_LIMITED: 429, ErrorCode.QUEUE_FULL: 429, ErrorCode.NOT_FOUND: 404,
               ErrorCode.COMFY_UNAVAILABLE: 503, ErrorCode.STORE_UNAVAILABLE: 503, ErrorCode.COMFY_ERROR: 502,
               ErrorCode.UNAUTHORIZED: 401, ErrorCode.INVALID_PARAMS: 422, ErrorCode.UNKNOWN_TEMPLATE: 422}
# Refusals that another try may turn into an acceptance: never recorded for an Idempotency-Key.
RETRYABLE = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.QUEUE_FULL, ErrorCode.COMFY_UNAVAILABLE,
                       ErrorCode.STORE_UNAVAILABLE})
MAX_IDEMPOTENCY_KEY = 255
DEFAULT_PAGE = 20
MAX_PAGE = 100


def iso(ts: float | None) -> str | None:
    """RFC 3339 in UTC with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def error_body(e: RequestError) -> dict:
    return {"error": e.to_data()}


def expired_body(job_id: str, retention_s: float) -> dict:
    return {"error": {"code": "expired", "prompt_id": job_id,
                      "message": f"The job and its outputs expired {retention_s:g} s after it ended "
                                 "(FINISHED_PROMPT_RETENTION_S)"}}


class JobViews:
    """Builds the JSON of a job, the same for every endpoint."""

    def __init__(self, service: JobService, settings, prefix: str):
        self.service = service
        self.retention = settings.finished_prompt_retention_s
        self.show_backend = settings.jobs_show_backend
        self.prefix = prefix

    def job_url(self, job_id: str) -> str:
        return f"{self.prefix}/job/{job_id}"

    def urls(self, job: Job) -> dict:
        me = self.job_url(job.job_id)
        return {"self": me, "cancel": me + "/cancel", "events": me + "/events",
                "outputs": f"{self.prefix}/outputs/{job.job_id}"}

    def status(self, job: Job) -> dict:
        return {"status": STATUS.get(job.state, "failed"), "state": job.state,
                "queue_position": self.service.queue_position(job)}

    def progress(self, job: Job) -> dict:
        return self._progress(job, (job.payload or {}).get("prompt") or {})

    def outputs(self, job: Job) -> list[dict]:
        return self._outputs(job)

    def view(self, job: Job) -> dict:
        prompt = (job.payload or {}).get("prompt") or {}
        return {
            "job_id": job.job_id, "status": STATUS.get(job.state, "failed"), "state": job.state,
            "created_at": iso(job.created_at), "started_at": iso(job.started_at),
            "completed_at": iso(job.finished_at),
            "expires_at": iso(job.finished_at + self.retention) if job.finished_at is not None else None,
            "queue_position": self.service.queue_position(job),
            "progress": self._progress(job, prompt), "outputs": self._outputs(job), "error": self._error(job),
            "urls": self.urls(job), "template": job.template, "cached": job.cached,
            **({"backend": job.backend or None} if self.show_backend else {}),
        }

    @staticmethod
    def _progress(job: Job, prompt: dict) -> dict:
        total = len(prompt) or job.nodes_total
        done = total if job.state == JobState.SUCCESS and total else len(job.nodes_done)
        node, step, steps = job.current if job.current and job.state == JobState.RUNNING else (None, None, None)
        if job.state == JobState.SUCCESS:
            value = 1.0
        elif total and job.state == JobState.RUNNING:
            part = step / steps if isinstance(step, (int, float)) and isinstance(steps, (int, float)) and steps else 0
            value = min(0.99, (done + part) / total)
        else:
            value = 0.0
        node_class = prompt.get(node, {}).get("class_type") if isinstance(node, str) else None
        return {"value": round(value, 4), "nodes_done": done, "nodes_total": total, "current_node": node,
                "current_node_class": node_class, "step": step, "steps": steps}

    def _outputs(self, job: Job) -> list[dict]:
        views, per_node = [], {}
        for file in listed_files(job.outputs):
            index = per_node[file["node"]] = per_node.get(file["node"], -1) + 1
            views.append({"node_id": file["node"], "index": index, "kind": file["kind"],
                          "filename": file["filename"], "subfolder": file["subfolder"], "type": file["type"],
                          "content_type": mimetypes.guess_type(file["filename"])[0] or "application/octet-stream",
                          "url": f"{self.prefix}/job/{job.job_id}/image/{file['node']}/{index}"})
        return views

    @staticmethod
    def _error(job: Job) -> dict | None:
        result = job.result if isinstance(job.result, dict) else {}
        if job.state == JobState.ERROR:
            return {"code": "execution_error", "message": result.get("exception_message", "Execution failed"),
                    "node_id": result.get("node_id"), "class_type": result.get("node_type"),
                    "exception_type": result.get("exception_type")}
        if job.state == JobState.TIMED_OUT:
            return {"code": "timed_out", "message": f"Execution exceeded its time limit of {job.timeout_s:g} s"}
        if job.state in (JobState.REJECTED, JobState.LOST):
            error = {"code": result.get("code", ErrorCode.INVALID_PROMPT if job.state == JobState.REJECTED
                                        else ErrorCode.OUTCOME_UNKNOWN),
                     "message": result.get("message", "The job failed")}
            if "node_errors" in result:
                error["node_errors"] = result["node_errors"]  # ComfyUI's, unchanged
            if "backends" in result:
                error["backends"] = result["backends"]  # what each backend lacks (none could run it)
            return error
        return None


class ApiHandler(UserHandler):
    """A jobs API endpoint: the caller's jobs, JSON in and out, RequestErrors as HTTP."""

    def initialize(self, verifier, metrics, service: JobService, views: JobViews, settings, **kwargs):
        super().initialize(verifier, metrics)
        self.service = service
        self.views = views
        self.options = settings

    def write_request_error(self, e: RequestError) -> None:
        status = HTTP_STATUS.get(e.code, 500)
        retry_after = e.details.get("retry_after") if isinstance(e.details, dict) else None
        if retry_after is not None:
            self.set_header("Retry-After", str(max(1, round(retry_after + 0.5))))
        self.write_json(error_body(e), status)

    def owned(self, job_id: str) -> Job | None:
        try:
            return self.service.get(self.identity.user_id, job_id)
        except RequestError as e:  # unknown and another user's answer alike
            if self.service.expired(self.identity.user_id, job_id):
                self.write_json(expired_body(job_id, self.options.finished_prompt_retention_s), 410)
            else:
                self.write_request_error(RequestError(ErrorCode.NOT_FOUND, "No such job", prompt_id=e.prompt_id))
            return None

    def wait_asked(self) -> float:
        """Seconds asked for by ``Prefer: wait=N`` (RFC 7240), bounded by MAX_WAIT_S."""
        for preference in self.request.headers.get_list("Prefer"):
            for part in preference.split(","):
                name, _, value = part.split(";")[0].strip().partition("=")
                if name.strip().lower() == "wait":
                    try:
                        asked = float(value.strip().strip('"'))
                    except ValueError:
                        continue
                    wait = max(0.0, min(asked, self.options.max_wait_s))
                    self.set_header("Preference-Applied", f"wait={wait:g}")
                    return wait
        return 0.0

    async def write_job(self, job: Job, status: int = 200) -> None:
        wait = self.wait_asked()
        if wait:
            await self.service.wait_finished(job, wait)
            if job.finished and status == 202:
                status = 200
        self.write_json(self.views.view(job), status)


class GenerateHandler(ApiHandler):
    """POST /generate: a workflow (API format), ``{prompt, extra_data?, prompt_id?, ...}`` or
    ``{template, params, ...}``; 202 with the job. ``Idempotency-Key`` makes retries safe; ``Prefer: wait=N`` waits."""

    def initialize(self, isolation: UserIsolation | None = None, in_flight: set | None = None, **kwargs):
        super().initialize(**kwargs)
        self.in_flight = in_flight if in_flight is not None else set()

    async def post(self) -> None:
        owner = self.identity.user_id
        try:
            request = self._parse()
        except RequestError as e:
            return self.write_request_error(e)
        key = self._key()
        if key is False:
            return
        if key is None:
            return await self._submit(owner, request, None)
        fingerprint = hashlib.sha256(json.dumps(self._body, sort_keys=True, separators=(",", ":"),
                                                ensure_ascii=False).encode()).hexdigest()
        if (owner, key) in self.in_flight:
            self.set_header("Retry-After", "1")
            return self.write_json({"error": {"code": "idempotency_conflict", "message":
                                              "A request with this Idempotency-Key is still being processed"}}, 409)
        try:
            recorded = self.service.recall(owner, key)
        except RequestError as e:
            return self.write_request_error(e)
        if recorded is not None:
            if recorded.fingerprint != fingerprint:
                return self.write_json({"error": {"code": "idempotency_key_reuse", "message":
                                                  "This Idempotency-Key was used with a different request"}}, 422)
            self.set_header("Idempotency-Replayed", "true")
            job_id = json.loads(recorded.body).get("job_id")
            if job_id:
                self.set_header("Location", self.views.job_url(job_id))
            self.set_status(recorded.status)
            return self.finish(recorded.body)
        self.in_flight.add((owner, key))
        try:
            await self._submit(owner, request, (key, fingerprint))
        finally:
            self.in_flight.discard((owner, key))

    def _answer(self, owner: str, key: str, fingerprint: str, status: int, body: dict) -> IdempotentAnswer:
        return IdempotentAnswer(owner, key, fingerprint, status, json.dumps(body, separators=(",", ":")),
                                self.service.tracker.wall() + self.options.idempotency_key_ttl_s)

    async def _submit(self, owner: str, request, idempotency: tuple[str, str] | None) -> None:
        answer_for = None
        if idempotency is not None:
            key, fingerprint = idempotency
            answer_for = lambda job: self._answer(owner, key, fingerprint, 202, self.views.view(job))  # noqa: E731
        try:
            job = await self.service.submit(owner, request, answer_for)
        except RequestError as e:
            if idempotency is not None and e.code not in RETRYABLE:
                self.service.remember(self._answer(owner, *idempotency, HTTP_STATUS.get(e.code, 500), error_body(e)))
            return self.write_request_error(e)
        self.set_header("Location", self.views.urls(job)["self"])
        wait = self.wait_asked()
        if wait:
            await self.service.wait_finished(job, wait)
        if job.state == JobState.REJECTED:  # ComfyUI refused it before we answered: say so now
            body = {"error": {**self.views._error(job), "prompt_id": job.job_id}}
            if idempotency is not None:
                self.service.remember(self._answer(owner, *idempotency, 422, body))
            return self.write_json(body, 422)
        self.write_json(self.views.view(job), 200 if job.finished else 202)

    def _parse(self):
        if len(self.request.body) > self.options.max_message_bytes:
            raise RequestError(ErrorCode.MESSAGE_TOO_LARGE,
                               f"Body over {self.options.max_message_bytes} bytes (MAX_MESSAGE_BYTES)")
        try:
            body = json.loads(self.request.body or b"null")
        except (ValueError, RecursionError):
            raise RequestError(ErrorCode.INVALID_MESSAGE, "Body is not valid JSON") from None
        if not isinstance(body, dict) or not body:
            raise RequestError(ErrorCode.INVALID_MESSAGE,
                               "Body must be a workflow in API format or {\"prompt\": {...}, ...}")
        self._body = body
        inner = body.get("prompt")
        templated = isinstance(body.get("template"), str)  # ({template, params}; a node is an object)
        data: dict[str, Any] = body if templated or isinstance(inner, dict) and "class_type" not in inner \
            else {"prompt": body}
        request = parse_submit(data, self.options.max_prompt_nodes, self.options.node_allowlist)
        if self._no_cache_asked():
            request = dataclasses.replace(request, no_cache=True)
        return request

    def _no_cache_asked(self) -> bool:
        """``Cache-Control: no-cache`` (or ``no-store``): neither answered from nor stored in the
        result cache (RFC 9111's request directives)."""
        directives = {part.split("=")[0].strip().lower()
                      for value in self.request.headers.get_list("Cache-Control") for part in value.split(",")}
        return bool(directives & {"no-cache", "no-store"})

    def _key(self):
        """The Idempotency-Key (a structured-field string, quotes optional), None without one,
        False once a 400 was written for a bad one."""
        raw = self.request.headers.get("Idempotency-Key")
        if raw is None:
            return None
        key = raw.strip()
        if len(key) >= 2 and key[0] == key[-1] == '"':
            key = key[1:-1]
        if not key or len(key) > MAX_IDEMPOTENCY_KEY or not all(" " <= c <= "~" for c in key):
            self.write_request_error(RequestError(ErrorCode.INVALID_MESSAGE,
                                                  f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable "
                                                  "ASCII characters"))
            return False
        return key


class JobHandler(ApiHandler):
    """GET /job/{id}: the job; ``Prefer: wait=N`` waits up to N s for it to end."""

    async def get(self, job_id: str) -> None:
        job = self.owned(job_id)
        if job is not None:
            await self.write_job(job)


class JobCancelHandler(ApiHandler):
    """POST /job/{id}/cancel: idempotent; 202 while the cancel takes effect, 200 once it has,
    409 for a job that ended otherwise."""

    async def post(self, job_id: str) -> None:
        job = self.owned(job_id)
        if job is None:
            return
        if job.state in CANCELLED:
            return self.write_json(self.views.view(job), 200)
        if job.finished:
            return self.write_json({"error": {"code": "already_finished", "prompt_id": job.job_id,
                                              "message": f"The job already ended: {STATUS.get(job.state)}"}}, 409)
        try:
            await self.service.cancel(self.identity.user_id, job_id)
        except RequestError as e:
            return self.write_request_error(e)
        await self.write_job(job, 200 if job.state in CANCELLED else 202)


class JobListHandler(ApiHandler):
    """GET /jobs?status=completed,failed&limit=20&cursor=...: the caller's jobs, newest first."""

    def get(self) -> None:
        wanted = [s for s in self.get_query_argument("status", "").split(",") if s]
        unknown = [s for s in wanted if s not in STATUSES]
        if unknown:
            return self.write_request_error(RequestError(
                ErrorCode.INVALID_MESSAGE, f"Unknown status {unknown[0][:32]!r}; one of {', '.join(sorted(STATUSES))}"))
        try:
            limit = int(self.get_query_argument("limit", str(DEFAULT_PAGE)))
            cursor = self.get_query_argument("cursor", None)
            before = int(cursor) if cursor is not None else None
        except ValueError:
            return self.write_request_error(RequestError(ErrorCode.INVALID_MESSAGE, "limit and cursor are integers"))
        if not 1 <= limit <= MAX_PAGE:
            return self.write_request_error(RequestError(ErrorCode.INVALID_MESSAGE, f"limit is 1-{MAX_PAGE}"))
        states = {state for state, status in STATUS.items() if status in wanted} if wanted else None
        jobs = [j for j in self.service.jobs_of(self.identity.user_id, states) if before is None or j.order < before]
        page = jobs[:limit]
        more = len(jobs) > limit
        self.write_json({"jobs": [self.views.view(j) for j in page],
                         "next_cursor": str(page[-1].order) if more else None})


class JobImageHandler(FileDownload):
    """GET /job/{id}/image/{node}/{index}: the index-th file of that node's outputs, streamed
    from the backend that made it (ETag, Range and 304 as ComfyUI answers them)."""

    def initialize(self, service: JobService, pool, isolation: UserIsolation | None, retention: float = 0,
                   cache=None, **kwargs):
        super().initialize(**kwargs)
        self.cache = cache
        self.retention = retention
        self.service = service
        self.pool = pool
        self.isolation = isolation

    async def get(self, job_id: str, node_id: str, index: str) -> None:
        try:
            job = self.service.get(self.identity.user_id, job_id)
        except RequestError:
            if self.service.expired(self.identity.user_id, job_id):
                return self.write_json(expired_body(job_id, self.retention), 410)
            return self.write_json_error(404, "not_found", "No such job")
        if job.cached:  # its files are the proxy's own copies (jobs/cache.py)
            mine = [f for f in cached_files(job) if f["node"] == node_id]
            if int(index) >= len(mine) or self.cache is None:
                return self.write_json_error(404, "not_found", "No such output")
            file = mine[int(index)]
            return await self.serve_copy(self.cache.blobs, file)
        try:
            backend, files = await job_files(job, self.pool, self.isolation)
        except ComfyUnavailable:  # nothing known without ComfyUI
            return self.write_json_error(503, "comfy_unavailable", "ComfyUI is temporarily unavailable")
        mine = [f for f in files if f["node"] == node_id]
        if backend is None or int(index) >= len(mine):
            return self.write_json_error(404, "not_found", "No such output")
        file = mine[int(index)]
        await self.download(backend, file["filename"], file["subfolder"], file["type"])




class JobsHandler(GenerateHandler):
    """/jobs: GET lists the caller's jobs, POST is /generate."""

    get = JobListHandler.get
