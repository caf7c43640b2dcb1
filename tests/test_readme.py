"""The README's examples run as written, and the docs are valid reStructuredText."""
from __future__ import annotations

import asyncio
import glob
import os
import re
import sys

import pytest

from .helpers import TIMEOUT, ProxyHarness

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = os.path.join(ROOT, "README.rst")


def python_examples() -> list[str]:
    """The README's literal blocks that are whole programs (they end in asyncio.run(main()))."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"::\n\n((?:(?:    .*)?\n)+)", text)
    programs = []
    for block in blocks:
        code = "\n".join(line[4:] for line in block.splitlines())
        if "asyncio.run(main())" in code:
            programs.append(code)
    return programs


def test_the_readme_has_both_python_examples():
    programs = python_examples()
    assert len(programs) == 2 and "ProxyClient" in programs[0] and "JobsClient" in programs[1]


@pytest.mark.parametrize("index", [0, 1])
async def test_a_readme_example_runs_as_written(io_loop, index):
    program = python_examples()[index]
    async with ProxyHarness() as h:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", program, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=ROOT, COMFY_WS_PROXY_TOKEN=h.token("alice"),
                     COMFY_WS_PROXY_URL=f"ws://127.0.0.1:{h.port}/ws", COMFY_WS_PROXY_HTTP=h.url))
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
        assert process.returncode == 0, err.decode()
        last = out.decode().strip().splitlines()[-1]
        assert last.startswith("success ['6', '7']" if index == 0 else "completed ["), out.decode()
        if index == 1:
            assert last.count(".png") == 2  # both outputs downloaded


def test_the_readme_and_the_docs_are_valid_restructuredtext():
    docutils_core = pytest.importorskip("docutils.core")
    for path in [README, *glob.glob(os.path.join(ROOT, "docs", "*.rst"))]:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        # errors and warnings (a broken table, an unknown role, a bad underline) fail the test
        docutils_core.publish_doctree(source, source_path=path,
                                      settings_overrides={"halt_level": 2, "report_level": 2})


def test_the_readme_stays_a_newcomers_document():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 300
    for doc in re.findall(r"<(docs/[a-z-]+\.rst)>", "\n".join(lines)):
        assert os.path.exists(os.path.join(ROOT, doc)), doc


async def test_the_embedding_example_runs_and_stops_on_ctrl_c(io_loop, tmp_path):
    import json
    import signal

    from tornado.httpclient import AsyncHTTPClient

    from comfy_ws_proxy.testing.tokens import DevKey

    from .helpers import free_port

    with open(os.path.join(ROOT, "docs", "deployment.rst"), encoding="utf-8") as f:
        text = f.read()
    [block] = [b for b in re.findall(r"::\n\n((?:(?:    .*)?\n)+)", text) if "add_routes(app" in b]
    program = "\n".join(line[4:] for line in block.splitlines())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(DevKey.generate().jwks()))
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", program, cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=ROOT, APP_PORT=str(port), COMFY_URL="http://127.0.0.1:9", DEV_MODE="true",
                 JWT_KEY_FILE=str(jwks), STORE_PATH=str(tmp_path / "store.sqlite3")))
    http = AsyncHTTPClient(force_instance=True)
    try:
        async def listening():
            while True:
                line = (await process.stderr.readline()).decode()
                assert line, "the example exited"
                if "listening on" in line:
                    return
        await asyncio.wait_for(listening(), TIMEOUT)
        health = await http.fetch(f"http://127.0.0.1:{port}/comfy/health", raise_error=False)
        assert health.code == 200
        home = await http.fetch(f"http://127.0.0.1:{port}/", raise_error=False)
        assert home.body == b"my application"
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
        assert process.returncode == 0 and b"Traceback" not in err, err.decode()
    finally:
        http.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
