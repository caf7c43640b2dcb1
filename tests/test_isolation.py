"""ISOLATE_USERS: one user's files and cache entries are out of every other user's reach
(issue 15, findings 2 and 3; the behaviour was checked on a real ComfyUI 0.3.64 first)."""
from __future__ import annotations

import asyncio
import copy
import json
import random
import socket
from urllib.parse import urlencode

import pytest

from comfy_ws_proxy.jobs.isolation import CACHE_SCOPE_INPUT, UserIsolation
from comfy_ws_proxy.model import RequestError

from .helpers import TIMEOUT, ProxyHarness

pytestmark = pytest.mark.usefixtures("io_loop")


def saved(color: int, prefix: str = "shot") -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def loaded(name: str, cls: str = "LoadImage") -> dict:
    return {"1": {"class_type": cls, "inputs": {"image": name}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copy"}}}


async def run_and_files(client, prompt: dict) -> tuple[str, list[dict], list[str]]:
    """Run a prompt: its id, the files its SaveImage wrote, and the nodes ComfyUI had cached."""
    accepted = await client.submit(prompt)
    assert accepted["type"] == "prompt_accepted", accepted
    prompt_id = accepted["data"]["prompt_id"]
    mine = lambda m: m["data"].get("prompt_id") == prompt_id  # noqa: E731
    cached = await client.next("execution_cached", mine)
    executed = await client.next("executed", lambda m: mine(m) and m["data"]["node"] == "2")
    await client.next("execution_success", mine)
    return prompt_id, executed["data"]["output"]["images"], cached["data"]["nodes"]


async def test_a_user_cannot_load_another_users_output_by_name_or_by_path():
    async with ProxyHarness() as h:
        alice, bob = await h.connect("alice"), await h.connect("bob")
        _, [alice_file], _ = await run_and_files(alice, saved(0x123456))
        folder, name = alice_file["subfolder"], alice_file["filename"]
        assert folder.startswith("u_") and ("output", folder, name) in h.sim._files

        # Alice loads her own output back, by its plain name or by its full listed name.
        for own_name in (f"{name} [output]", f"{folder}/{name} [output]"):
            _, [copy_file], _ = await run_and_files(alice, loaded(own_name))
            assert copy_file["subfolder"] == folder

        # Bob guesses the name (it was enough before) or names Alice's folder: each is read
        # inside his own folder, where there is no such file; ComfyUI says so.
        for guess in (f"{name} [output]", f"{folder}/{name} [output]"):
            for cls in ("LoadImage", "LoadImageOutput"):
                answer = await bob.submit(loaded(guess, cls))
                assert answer["type"] == "error" and answer["data"]["code"] == "invalid_prompt", answer
                [error] = answer["data"]["node_errors"]["1"]["errors"]
                assert error["type"] == "custom_validation_failed"
                assert error["details"].startswith("image - Invalid image file: u_")
                assert folder not in error["details"].split("/")[0]
        # Paths that climb out of the folder, absolute ones and backslashes never reach ComfyUI.
        posts = h.sim.prompt_posts if hasattr(h.sim, "prompt_posts") else None
        for escape in (f"../output/{folder}/{name}", f"../../output/{folder}/{name} [input]",
                       f"/comfyui/output/{folder}/{name}", f"{folder}\\{name} [output]", f"{name} [temp]"):
            answer = await bob.submit(loaded(escape))
            assert answer["type"] == "error" and answer["data"]["code"] == "invalid_prompt", (escape, answer)
            assert answer["data"]["details"]["node_id"] == "1"
            assert answer["data"]["details"]["input_name"] == "image"
            assert "prompt_id" in answer["data"]
        assert posts is None or posts == h.sim.prompt_posts
        # A custom node that reads an annotated path is confined the same way.
        unknown = {"1": {"class_type": "SomeCustomLoader", "inputs": {"path": f"../{folder}/{name} [output]"}}}
        answer = await bob.submit(unknown)
        assert answer["data"]["code"] == "invalid_prompt" and answer["data"]["details"]["input_name"] == "path"


async def test_an_identical_prompt_never_gets_another_users_file_or_cache():
    """ComfyUI's cache answered Bob's identical prompt with Alice's file, PNG metadata and all,
    and told him which nodes someone had just run. Now every user's cache entries are his own."""
    async with ProxyHarness() as h:
        alice, bob = await h.connect("alice"), await h.connect("bob")
        color = random.randrange(0xFFFFFF)
        alice_id, [alice_file], cached = await run_and_files(alice, saved(color))
        assert cached == []
        # Within one user the cache works as before: Alice's re-run is answered from it.
        _, [again], cached = await run_and_files(alice, saved(color))
        assert sorted(cached) == ["1", "2"] and again == alice_file
        bob_id, [bob_file], cached = await run_and_files(bob, saved(color))
        assert cached == []  # nothing of Alice's run is reused, or even mentioned
        assert bob_file["subfolder"] != alice_file["subfolder"]
        # And /outputs serves each their own file only.
        for user, prompt_id, file, other in (("alice", alice_id, alice_file, bob_file),
                                             ("bob", bob_id, bob_file, alice_file)):
            auth = {"Authorization": "Bearer " + h.token(user)}
            listing = json.loads((await h.get(f"/outputs/{prompt_id}", auth)).body)["files"]
            assert {(f["subfolder"], f["filename"]) for f in listing} == {(file["subfolder"], file["filename"])}
            query = urlencode({**{k: other[k] for k in ("filename", "subfolder")}, "type": "output"})
            assert (await h.get(f"/outputs/{prompt_id}/view?{query}", auth)).code == 404


async def test_filename_prefix_cannot_leave_the_users_folder():
    async with ProxyHarness() as h:
        bob = await h.connect("bob")
        for prefix in ("../x", "u_aaa/../../x", "/tmp/x", "a\\b", "", "a//b", ["5", 0]):
            answer = await bob.submit(saved(1, prefix))
            assert answer["type"] == "error" and answer["data"]["code"] == "invalid_prompt", (prefix, answer)
            assert answer["data"]["details"]["input_name"] == "filename_prefix"
        _, [file], _ = await run_and_files(bob, saved(2, "renders/%year%/shot"))
        folder = file["subfolder"].split("/")[0]
        assert file["subfolder"] == f"{folder}/renders/%year%"  # subfolders of his own are fine
        _, [file], _ = await run_and_files(bob, saved(3, f"{folder}/renders/shot"))  # not doubled
        assert file["subfolder"] == f"{folder}/renders"


async def test_user_folders_are_stable_across_restarts_and_unguessable():
    async with ProxyHarness(store_path="file") as h:
        alice = await h.connect("alice")
        _, [before], _ = await run_and_files(alice, saved(4))
        await alice.close()
        await h.restart_proxy("term")
        alice = await h.connect("alice")
        _, [after], _ = await run_and_files(alice, saved(5))
        assert after["subfolder"] == before["subfolder"]  # the secret is kept in the store
    async with ProxyHarness() as other:  # another deployment: another secret
        alice = await other.connect("alice")
        _, [elsewhere], _ = await run_and_files(alice, saved(4))
        assert elsewhere["subfolder"] != before["subfolder"]


def test_confine_rewrites_every_kind_of_file_reference():
    iso = UserIsolation(b"k" * 32, file_inputs=["MyLoader.path"], shared_cache_nodes=["CheckpointLoaderSimple"],
                        shared_input_folder="shared")
    own = iso.folder("alice")
    assert own == iso.folder("alice") != iso.folder("bob") and own.startswith("u_") and len(own) == 26
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"class_type": "LoadImageOutput", "inputs": {"image": "sub/x.png [output]"}},
        "3": {"class_type": "Load3D", "inputs": {"model_file": "m.glb", "image": {"image": "a.png [input]",
                                                                                  "mask": "b.png"}}},
        "4": {"class_type": "MyLoader", "inputs": {"path": "data.bin"}},
        "5": {"class_type": "Other", "inputs": {"text": "a cat / a dog ...", "file": "y.png [input]"}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "shared/logo.png"}},
        "7": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors",
                                                                  CACHE_SCOPE_INPUT: iso.folder("bob")}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ComfyUI",
                                                    CACHE_SCOPE_INPUT: iso.folder("bob")}},
    }
    original = copy.deepcopy(prompt)
    out = iso.confine("alice", prompt)
    assert prompt == original  # the client's prompt is not changed in place
    assert out["1"]["inputs"]["image"] == f"{own}/cat.png"
    assert out["2"]["inputs"]["image"] == f"{own}/sub/x.png [output]"
    assert out["3"]["inputs"]["model_file"] == f"{own}/m.glb"
    assert out["3"]["inputs"]["image"] == {"image": f"{own}/a.png [input]", "mask": f"{own}/b.png"}
    assert out["4"]["inputs"]["path"] == f"{own}/data.bin"
    assert out["5"]["inputs"] == {"text": "a cat / a dog ...", "file": f"{own}/y.png [input]",
                                  CACHE_SCOPE_INPUT: own}
    assert out["6"]["inputs"]["image"] == "shared/logo.png"
    assert CACHE_SCOPE_INPUT not in out["7"]["inputs"]  # shared: and Bob's scope, sent by Alice, is gone
    assert out["8"]["inputs"] == {"images": ["1", 0], "filename_prefix": f"{own}/ComfyUI",
                                  CACHE_SCOPE_INPUT: own}
    for bad in ({"1": {"class_type": "LoadImage", "inputs": {"image": ["9", 0]}}},
                {"1": {"class_type": "LoadImage", "inputs": {"image": "a/./b.png"}}},
                {"1": {"class_type": "LoadImage", "inputs": {"image": "C:x.png"}}},
                {"1": {"class_type": "LoadImage", "inputs": {"image": "x\x00.png"}}},
                {"1": {"class_type": "Other", "inputs": {"text": "../../secret"}}},
                {"1": {"class_type": "LoadImage", "inputs": {"image": "shared/../x.png"}}},
                {"1": {"class_type": "LoadImageOutput", "inputs": {"image": "shared/x.png [output]"}}}):
        try:
            result = iso.confine("alice", bad)
        except RequestError as e:
            assert e.code == "invalid_prompt" and e.details["node_id"] == "1"
        else:  # the shared folder is an input folder only: an output of that name is Alice's own
            assert result["1"]["inputs"]["image"] == f"{own}/shared/x.png [output]", bad


async def test_downloads_are_capped_per_user_and_a_stalled_reader_is_let_go():
    """A client that does not read holds one chunk, not the file: its download ends after
    DOWNLOAD_STALL_TIMEOUT_S and gives its slot back (40 stalled downloads of a 7 MB file
    had cost 159 MB)."""
    loop = asyncio.get_running_loop()
    async with ProxyHarness(max_downloads_per_user=1, download_stall_timeout_s=0.2) as h:
        alice = await h.connect("alice")
        prompt_id, [file], _ = await run_and_files(alice, saved(6))
        big = bytes(random.getrandbits(8) for _ in range(256)) * (64 * 1024)  # 16 MiB
        h.sim._files[("output", file["subfolder"], file["filename"])] = big
        auth = {"Authorization": "Bearer " + h.token("alice")}
        path = f"/outputs/{prompt_id}/view?" + urlencode({**{k: file[k] for k in ("filename", "subfolder")},
                                                          "type": "output"})
        given_back = loop.create_future()
        give_back = h.state.downloads.give_back

        def observed(owner):
            give_back(owner)
            if not given_back.done():
                given_back.set_result(owner)

        h.state.downloads.give_back = observed
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.setblocking(False)
        await loop.sock_connect(stalled, ("127.0.0.1", h.port))
        await loop.sock_sendall(stalled, (f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}"
                                          "\r\n\r\n").encode())
        try:
            second = await h.get(path, auth)
            if not given_back.done():  # the stalled one still holds the only slot
                assert second.code == 429 and json.loads(second.body)["error"]["code"] == "too_many_downloads"
            assert await asyncio.wait_for(given_back, TIMEOUT) == "alice"
        finally:
            stalled.close()
        whole = await h.get(path, auth)  # a reader that reads gets every byte
        assert whole.code == 200 and whole.body == big
        assert whole.headers["Content-Length"] == str(len(big))
        assert h.state.downloads.active == {}
