"""scripts/quickstart.sh with its default ports taken (ComfyUI's 8188, the proxy's 8190): it
says what holds them, moves to free ones, checks that the processes it started are the ones
listening, runs the workflow through them and ends with a running proxy; a port the user
insists on that is taken stops it, naming the holder. Bounded by a timeout guard; no install
(QUICKSTART_SKIP_INSTALL), its files in a temporary folder, stopped after the run."""
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
GUARD_S = 120


def hold(port: int) -> socket.socket | None:
    """A listening socket on 127.0.0.1:port, or None if something else already holds it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind (an earlier run's TIME_WAIT)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen()
    s.setblocking(False)
    return s


def quickstart(tmp_path, **env) -> tuple[int, str]:
    """Run the script in a session of its own; on the guard's expiry, end the whole session."""
    full_env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "PYTHONPATH": ROOT,
                "QUICKSTART_SKIP_INSTALL": "1", "QUICKSTART_EXIT_AFTER_RUN": "1",
                "QUICKSTART_DIR": str(tmp_path / "dev"), **env}
    process = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "quickstart.sh")], env=full_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=GUARD_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"quickstart.sh still running after {GUARD_S} s:\n{output.decode(errors='replace')}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # nothing should be left; if it is, it must not linger
            leftover = True
        except ProcessLookupError:
            leftover = False
    assert not leftover, "quickstart.sh left processes running after it exited"
    return process.returncode, output.decode(errors="replace")


def no_connection_reached(held: socket.socket | None) -> bool:
    if held is None:
        return True  # someone else's socket: cannot look
    try:
        held.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def test_quickstart_moves_off_taken_default_ports_and_ends_with_a_running_proxy(tmp_path):
    held = {port: hold(port) for port in (8188, 8190)}
    try:
        status, output = quickstart(tmp_path)
        assert status == 0, output
        for port, what in ((8188, "the simulator"), (8190, "the proxy")):
            line = re.search(rf"port {port} is already in use, by (.*): {what} uses port (\d+) instead", output)
            assert line, output
            if held[port] is not None:
                assert f"pid {os.getpid()} " in line.group(1)  # the holder is named: this test
        sim_port = int(re.search(r"the simulator listens on http://127\.0\.0\.1:(\d+) \(pid \d+", output).group(1))
        proxy_port = int(re.search(r"the proxy listens on http://127\.0\.0\.1:(\d+) \(pid \d+", output).group(1))
        assert sim_port not in (8188, 8190) and proxy_port not in (8188, 8190) and sim_port != proxy_port
        assert f"ComfyUI at http://127.0.0.1:{sim_port}" in output
        assert re.search(r"prompt [0-9a-f-]{36}: success", output), output
        # the outputs, in the user's own folder (ISOLATE_USERS), named as a path
        assert len(re.findall(r"node 4: output/u_[0-9a-f]{24}/proxyprobe_ws_\d{5}_\.png", output)) == 3, output
        assert f"The proxy is running at http://127.0.0.1:{proxy_port}" in output
        assert f"the demo page: http://127.0.0.1:{proxy_port}/demo" in output
        # Whatever held the default ports was not used for the run.
        assert all(no_connection_reached(s) for s in held.values())
    finally:
        for s in held.values():
            if s is not None:
                s.close()


def test_a_port_the_user_insists_on_that_is_taken_stops_the_quickstart_naming_its_holder(tmp_path):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        status, output = quickstart(tmp_path, PORT=str(port))
        assert status == 1, output
        assert f"quickstart: error: port {port} is already in use, by pid {os.getpid()} " in output
        assert "the proxy cannot use it" in output
        assert "The proxy is running" not in output and "starting the proxy" not in output
    finally:
        held.close()
