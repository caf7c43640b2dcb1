"""POST /upload: a user's images, kept per user, placed on the backend before the job."""
from __future__ import annotations

import json
import uuid

import pytest

from comfy_ws_proxy.testing.comfyui import uniform_png

from .helpers import ProxyHarness

pytestmark = pytest.mark.usefixtures("io_loop")

PNG = uniform_png(24, 16, (0.25, 0.5, 0.75), 1)


def loading(name: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "up"}}}


async def upload(h, body: bytes, content_type: str = "image/png", user: str | None = "alice"):
    headers = {"Content-Type": content_type}
    if user:
        headers["Authorization"] = "Bearer " + h.token(user)
    return await h.http.fetch(h.url + "/upload", method="POST", body=body, headers=headers, raise_error=False)


def multipart(data: bytes, filename: str = "cat.png") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def run(h, prompt: dict, user: str = "alice") -> dict:
    answer = await h.http.fetch(h.url + "/generate", method="POST", body=json.dumps(prompt), raise_error=False,
                                headers={"Authorization": "Bearer " + h.token(user), "Prefer": "wait=10"})
    return json.loads(answer.body)


async def test_an_upload_is_the_owners_to_load_and_reaches_the_backend_once():
    async with ProxyHarness() as h:
        raw = await upload(h, PNG)
        assert raw.code == 201
        stored = json.loads(raw.body)
        assert stored["name"].endswith(".png") and stored["size"] == len(PNG)
        assert stored["content_type"] == "image/png" and len(stored["sha256"]) == 64
        body, kind = multipart(PNG)
        again = json.loads((await upload(h, body, kind)).body)
        assert again["name"] == stored["name"]  # named by content
        done = await run(h, loading(stored["name"]))
        assert done["status"] == "completed", done
        folder = done["outputs"][0]["subfolder"]
        assert ("input", folder, stored["name"]) in h.sim._files
        assert h.sim._files[("input", folder, stored["name"])] == PNG
        # the loaded image is the uploaded one: 24 x 16
        saved = h.sim._pixels[("output", folder, done["outputs"][0]["filename"])]
        assert saved[:2] == (16, 24)
        await run(h, loading(stored["name"]))
        assert len(h.state.uploads.placed) == 1  # placed once on this backend
        # Bob cannot load Alice's upload, by name or by her folder.
        for name in (stored["name"], f"{folder}/{stored['name']}"):
            refused = await run(h, loading(name), user="bob")
            assert refused["error"]["code"] == "invalid_prompt", refused
            [error] = refused["error"]["node_errors"]["1"]["errors"]
            assert "Invalid image file" in error["details"]


async def test_only_real_images_within_the_size_limit_are_taken():
    async with ProxyHarness(upload_max_bytes=4096) as h:
        for body, kind in ((b"just text, named .png", "image/png"), (b"GIF87a" + b"x" * 10, "image/gif"),
                           multipart(b"<svg/>", "x.png")):
            answer = await upload(h, body, kind)
            if body.startswith(b"GIF87a"):
                assert answer.code == 201 and json.loads(answer.body)["name"].endswith(".gif")
                continue
            assert answer.code == 415 and json.loads(answer.body)["error"]["code"] == "unsupported_media_type"
        big = await upload(h, PNG + b"\0" * 5000)
        assert big.code == 413 and json.loads(big.body)["error"]["code"] == "message_too_large"
        assert (await upload(h, PNG, user=None)).code == 401
        empty, kind = multipart(b"")
        assert (await upload(h, empty.replace(b'name="image"', b'name="other"'), kind)).code == 415
