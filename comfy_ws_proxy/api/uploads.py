"""POST /upload: an image for the caller's workflows (multipart ``image`` field, or the raw
bytes with an image Content-Type)."""
from __future__ import annotations

import tornado.httputil
import tornado.web

from ..jobs.uploads import UploadStore, image_kind
from .base import UserHandler


@tornado.web.stream_request_body
class UploadHandler(UserHandler):
    """The body is counted as it arrives (UPLOAD_MAX_BYTES, 413 at once past it), at most
    MAX_CONCURRENT_UPLOADS are read at a time, and only a real image is kept (its signature:
    PNG, JPEG, GIF, WebP; 415 otherwise). 201 with the name to use in LoadImage."""

    active = 0  # uploads being received, in this process

    def initialize(self, verifier, metrics, uploads: UploadStore, settings):
        super().initialize(verifier, metrics)
        self.uploads = uploads
        self.limit = settings.upload_max_bytes
        self.concurrent = settings.max_concurrent_uploads
        self.chunks: list[bytes] = []
        self.size = 0
        self.counted = False

    async def prepare(self):
        await super().prepare()
        if self._finished:
            return
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return self._too_large()
        if UploadHandler.active >= self.concurrent:
            self.set_header("Retry-After", "1")
            return self.write_json_error(503, "too_many_uploads", "Too many uploads at once; try again")
        UploadHandler.active += 1
        self.counted = True

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.chunks.clear()
            return self._too_large()
        self.chunks.append(chunk)

    def _too_large(self) -> None:
        self.set_header("Connection", "close")
        self.write_json_error(413, "message_too_large", f"Uploads are at most {self.limit} bytes (UPLOAD_MAX_BYTES)")

    def on_finish(self) -> None:
        if self.counted:
            self.counted = False
            UploadHandler.active -= 1

    async def post(self):
        body = b"".join(self.chunks)
        self.chunks.clear()
        content_type = self.request.headers.get("Content-Type", "")
        data = body
        if content_type.startswith("multipart/form-data"):
            fields: dict = {}
            files: dict = {}
            tornado.httputil.parse_body_arguments(content_type, body, fields, files)
            picked = files.get("image") or next(iter(files.values()), None)
            if not picked:
                return self.write_json_error(400, "invalid_message", "The multipart body has no file (field 'image')")
            data = picked[0]["body"]
        if image_kind(data) is None:
            return self.write_json_error(415, "unsupported_media_type",
                                         "Only PNG, JPEG, GIF and WebP images are accepted (by their content)")
        stored = await self.uploads.put(self.identity.user_id, data)
        self.write_json({**stored, "use": {"class_type": "LoadImage", "inputs": {"image": stored["name"]}}}, 201)

    def on_connection_close(self) -> None:
        self.on_finish()
