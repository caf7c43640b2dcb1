"""python -m comfy_ws_proxy --config conf/prod.py : parse config, run the app, handle signals."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

from .app import make_app
from .auth import KeySetupError
from .config import ConfigError, describe, load_settings
from .logs import configure_logging
from .server import LimitedHTTPServer, descriptor_budget, raise_descriptor_limit
from .store import StoreOpenError

log = logging.getLogger("comfy_ws_proxy")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as e:
        print(f"comfy-ws-proxy: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        return asyncio.run(serve(settings))
    except ConfigError as e:
        print(f"comfy-ws-proxy: error: {e}", file=sys.stderr)
        return 2


async def serve(settings) -> int:
    soft_limit_before = raise_descriptor_limit()
    try:
        app, state = make_app(settings)
    except StoreOpenError as e:  # a missing folder, a directory, a store in use
        raise ConfigError(f"STORE_PATH: {e}") from None
    except KeySetupError as e:  # an unusable key file, keys that fit no allowed algorithm
        raise ConfigError(f"{e.option}: {e}") from None
    budget = descriptor_budget()
    server = LimitedHTTPServer.from_settings(app, settings, metrics=state.metrics, budget=budget)
    try:
        server.listen(settings.port, settings.host)
    except OSError as e:
        raise ConfigError(f"PORT: cannot listen on {settings.host}:{settings.port}: {e.strerror}") from None
    state.start()
    # Everything built so far (modules, the app) lives until exit: keep it out of the
    # collector's full passes, which otherwise rescan it all and stall the loop for tens of
    # ms when many users connect at once (measured in the connect-storm benchmark).
    gc.collect()
    gc.freeze()
    log.info("comfy_ws_proxy %s listening on http://%s:%d/ws, ComfyUI at %s", state.version, settings.host,
             settings.port, settings.comfy_url)
    for level, message in budget.report(settings.max_tcp_connections, raised_from=soft_limit_before):
        log.log(level, "%s", message)
    log.debug("settings: %s", dict(describe(settings)))
    if settings.dev_mode:
        log.warning("DEV_MODE is on: development defaults are allowed. Never run production like this.")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_seen = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            log.warning("second signal: exiting at once")
            os._exit(1)
        log.info("signal %s: shutting down gracefully (send it again to exit at once)", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    server.stop()
    await state.stop()
    await server.close_all_connections()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
