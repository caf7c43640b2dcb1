"""The jobs REST API from Python: submit, wait, download, cancel, over plain HTTP.

    async with JobsClient("http://127.0.0.1:8190", token) as jobs:
        job = await jobs.submit(workflow)           # safe to retry: an Idempotency-Key per call
        job = await jobs.wait(job["job_id"])        # Prefer: wait, repeated until it ends
        paths = await jobs.download(job, "out/")    # each output file, streamed to disk

Refusals raise ProxyError (AuthenticationError for a 401) with the server's code, message
and ComfyUI's node_errors; ``rate_limited``, ``queue_full`` and 503s are retried after their
``Retry-After`` (at most ``retries`` times) with the same Idempotency-Key, so a retried submit
never makes a second job.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import uuid
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from . import AuthenticationError, ProxyError, TokenProvider

FINISHED = frozenset({"completed", "failed", "cancelled", "timed_out"})
RETRYABLE_CODES = frozenset({"rate_limited", "queue_full", "comfy_unavailable", "store_unavailable",
                             "idempotency_conflict"})
WAIT_S = 60  # one Prefer: wait (the proxy bounds it by MAX_WAIT_S anyway)


class JobsClient:
    def __init__(self, base_url: str, token: str | TokenProvider, *, retries: int = 5, timeout: float = 30):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.retries = retries
        self.timeout = timeout
        self.http = AsyncHTTPClient(force_instance=True)

    async def __aenter__(self) -> "JobsClient":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    async def _token(self) -> str:
        if isinstance(self.token, str):
            return self.token
        token = self.token()
        return await token if inspect.isawaitable(token) else token

    async def _call(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                    wait: float = 0) -> tuple[int, dict]:
        for attempt in range(self.retries + 1):
            all_headers = {"Authorization": "Bearer " + await self._token(), **(headers or {})}
            if wait:
                all_headers["Prefer"] = f"wait={wait:g}"
            if body is not None:
                all_headers["Content-Type"] = "application/json"
            request = HTTPRequest(self.base_url + path, method=method, headers=all_headers,
                                  body=json.dumps(body) if body is not None else (b"" if method == "POST" else None),
                                  request_timeout=self.timeout + wait, follow_redirects=False)
            response = await self.http.fetch(request, raise_error=False)
            if response.code == 599:
                raise ConnectionError(f"cannot reach the proxy at {self.base_url}: {response.error}")
            data = json.loads(response.body) if response.body else {}
            if response.code < 400:
                return response.code, data
            error = dict(data.get("error") or {}) if isinstance(data, dict) else {}
            error.setdefault("code", "http_error")
            error.setdefault("message", f"HTTP {response.code}")
            error["status"] = response.code
            if response.code == 401:
                raise AuthenticationError({**error, "reason": error.get("reason")})
            if error["code"] in RETRYABLE_CODES and attempt < self.retries:
                retry_after = response.headers.get("Retry-After", "1")
                await asyncio.sleep(min(30.0, float(retry_after) if retry_after.isdigit() else 1.0))
                continue
            raise ProxyError(error)
        raise AssertionError("unreachable")

    async def submit(self, workflow: dict, *, idempotency_key: str | None = None, wait: float = 0,
                     **fields) -> dict:
        """Submit a workflow (API format); ``fields``: prompt_id, extra_data, timeout_s,
        webhook_url... The job as the proxy answered it."""
        key = idempotency_key or str(uuid.uuid4())
        _, job = await self._call("POST", "/generate", {"prompt": workflow, **fields},
                                  {"Idempotency-Key": key}, wait=wait)
        return job

    async def submit_template(self, template: str, params: dict | None = None, *,
                              idempotency_key: str | None = None, wait: float = 0, **fields) -> dict:
        """Submit a workflow template by name with its parameters (docs/templates.rst); the
        job's ``template`` holds the parameters used (a drawn seed too)."""
        key = idempotency_key or str(uuid.uuid4())
        _, job = await self._call("POST", "/generate", {"template": template, "params": params or {}, **fields},
                                  {"Idempotency-Key": key}, wait=wait)
        return job

    async def get(self, job_id: str, wait: float = 0) -> dict:
        _, job = await self._call("GET", f"/job/{quote(job_id)}", wait=wait)
        return job

    async def wait(self, job_id: str, timeout: float | None = None) -> dict:
        """The job once it has ended (or as it is when ``timeout`` seconds have passed)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = WAIT_S if deadline is None else max(0.0, min(WAIT_S, deadline - loop.time()))
            job = await self.get(job_id, wait=left)
            if job.get("status") in FINISHED or (deadline is not None and loop.time() >= deadline):
                return job

    async def cancel(self, job_id: str) -> dict:
        _, job = await self._call("POST", f"/job/{quote(job_id)}/cancel")
        return job

    async def jobs(self, status: str = "", limit: int = 20) -> list[dict]:
        _, page = await self._call("GET", f"/jobs?status={quote(status)}&limit={limit}")
        return page.get("jobs", [])

    async def download(self, job: dict, directory: str) -> list[str]:
        """Each output file of the job into ``directory`` (streamed; never overwrites a file).
        Returns the paths written."""
        os.makedirs(directory, exist_ok=True)
        saved = []
        for output in job.get("outputs") or []:
            name = os.path.basename(output.get("filename") or "") or "output"
            path, n = os.path.join(directory, name), 1
            stem, ext = os.path.splitext(name)
            while os.path.exists(path):
                path, n = os.path.join(directory, f"{stem}-{n}{ext}"), n + 1
            with open(path + ".partial", "wb") as f:
                def write(chunk: bytes, f=f) -> None:  # (a value returned here would be awaited)
                    f.write(chunk)

                request = HTTPRequest(self.base_url + output["url"], streaming_callback=write,
                                      headers={"Authorization": "Bearer " + await self._token()},
                                      request_timeout=self.timeout * 10)
                response = await self.http.fetch(request, raise_error=False)
            if response.code != 200:
                os.remove(path + ".partial")
                raise ProxyError({"code": "not_found" if response.code == 404 else "http_error",
                                  "message": f"{output['url']}: HTTP {response.code}", "status": response.code})
            os.replace(path + ".partial", path)
            saved.append(path)
        return saved


__all__ = ["JobsClient"]
