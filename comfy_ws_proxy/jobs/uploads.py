"""Users' uploaded images: kept by the proxy, per user, and placed on the backend that runs
a job just before its POST.

An upload is named by its content (``<sha256>.<ext>``) in the owner's folder (the same
``u_<hmac>`` folder as ISOLATE_USERS's), so a workflow names it as ``LoadImage {"image":
"<sha256>.png"}`` and the confinement turns that into the owner's own path: nobody can name
another user's upload. Only real images are taken (PNG, JPEG, GIF, WebP, by their signature,
never by the file name). Files are written and read off the IOLoop (an executor thread).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile

from ..backends.backend import Backend
from ..model import Job

# name -> content type; the folder of a name is checked against the job's owner
REFERENCE = re.compile(r"^(u_[0-9a-f]{24})/([0-9a-f]{64}\.(?:png|jpg|gif|webp))(?: \[input\])?$")
NAME = re.compile(r"^[0-9a-f]{64}\.(?:png|jpg|gif|webp)$")  # an upload's name, as put() returns it
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}


def image_kind(data: bytes) -> str | None:
    """The file extension of an image by its signature, or None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


class UploadStore:
    def __init__(self, root: str | None, folder_of):
        self._temporary = None
        if not root:  # (an in-memory store: the uploads live as long as the process)
            self._temporary = tempfile.TemporaryDirectory(prefix="comfy-ws-proxy-uploads-")
            root = self._temporary.name
        self.root = root
        self.folder_of = folder_of  # owner -> their folder
        self.placed: set[tuple[str, str, str]] = set()  # (backend, folder, name) already there

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()

    async def put(self, owner: str, data: bytes) -> dict:
        kind = image_kind(data)
        assert kind is not None
        digest = hashlib.sha256(data).hexdigest()
        folder = self.folder_of(owner)
        name = f"{digest}.{kind}"
        await asyncio.get_running_loop().run_in_executor(None, self._write, folder, name, data)
        return {"name": name, "size": len(data), "content_type": CONTENT_TYPES[kind], "sha256": digest}

    def _write(self, folder: str, name: str, data: bytes) -> None:
        directory = os.path.join(self.root, folder)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return  # the same content: named by its hash
        partial = path + ".partial"
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)  # never half a file under the final name

    async def reference(self, owner: str, name: str) -> str | None:
        """The input value that names the owner's upload ``name`` (``u_<folder>/<name>``), or
        None when they uploaded no such file (another user's upload answers the same)."""
        if not NAME.match(name):
            return None
        folder = self.folder_of(owner)
        path = os.path.join(self.root, folder, name)
        found = await asyncio.get_running_loop().run_in_executor(None, os.path.isfile, path)
        return f"{folder}/{name}" if found else None

    def _read(self, folder: str, name: str) -> bytes | None:
        try:
            with open(os.path.join(self.root, folder, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    async def place(self, job: Job, backend: Backend) -> None:
        """Upload to ``backend`` the owner's uploads the job's prompt names (once per backend).
        Raises what the backend's call raises (the POST is then not made)."""
        own = self.folder_of(job.owner)
        for node in ((job.payload or {}).get("prompt") or {}).values():
            inputs = node.get("inputs") if isinstance(node, dict) else None
            for value in (inputs or {}).values() if isinstance(inputs, dict) else ():
                match = REFERENCE.match(value) if isinstance(value, str) else None
                if match is None or match.group(1) != own:
                    continue
                key = (backend.name, own, match.group(2))
                if key in self.placed:
                    continue
                data = await asyncio.get_running_loop().run_in_executor(None, self._read, own, match.group(2))
                if data is None:
                    continue  # never uploaded: ComfyUI's validation says the file is missing
                await backend.upload_input(data, match.group(2), own, CONTENT_TYPES[match.group(2).rsplit(".", 1)[1]])
                self.placed.add(key)
