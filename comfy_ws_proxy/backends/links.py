"""LinkManager: the upstream sockets, one per (user, backend), owned outside any session.

Each pair's ComfyUI client id is durable (the store mints it once), so after a proxy
restart the new socket registers under the old id and ComfyUI goes on routing a running
prompt's events to it (PROTOCOL.md 3.2). A link is opened when its user has work on that
backend or a socket of its own, and closed when neither holds (``keep``, given by the
wiring). The manager also watches the links' health:

- deaf: ComfyUI broadcasts a ``status`` to every socket when its queue changes; a socket
  that saw none within ``deaf_after`` seconds of an accepted POST no longer receives
  (a reused client id evicts silently, PROTOCOL.md 3.2): it is recycled, and the
  reconnect is reconciled;
- unreachable: ComfyUI refused a connection, so the sockets it had before are gone too
  even if our side has not noticed: those (not the ones registered since) are recycled.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable, Iterable, Protocol

from ..metrics import Metrics
from .backend import Backend
from .link import ComfyLink
from .routing import Routed

log = logging.getLogger(__name__)


class FrameSink(Protocol):
    """What the links need of the jobs (the tracker)."""

    def owns(self, owner: str, job_id: str) -> bool: ...
    def is_running(self, job_id: str) -> bool: ...
    def upstream_frame(self, owner: str, backend: str, routed: Routed, frame: str | bytes | bytearray) -> None: ...
    def upstream_status(self, owner: str, text: str) -> None: ...


class LinkListener(Protocol):
    def link_up(self, link: ComfyLink, reconnected: bool) -> None: ...
    def link_down(self, link: ComfyLink) -> None: ...


class LinkManager:
    def __init__(self, settings, client_ids: Callable[[str, str], str], frames: FrameSink, metrics: Metrics):
        self.settings = settings
        self.client_ids = client_ids  # (owner, backend name) -> the durable client id
        self.frames = frames
        self.metrics = metrics
        self.deaf_after = settings.upstream_deaf_after_s
        self.links: dict[tuple[str, str], ComfyLink] = {}
        self.listeners: list[LinkListener] = []
        # keep(owner, backend name): is the link still wanted? Set by the wiring (it knows
        # both the jobs and the sockets); until then links are kept.
        self.keep: Callable[[str, str], bool] = lambda owner, backend: True
        self.owns = frames.owns
        self.is_running = frames.is_running
        self._handles: set[asyncio.TimerHandle] = set()  # deaf checks and idle sweeps
        self._closing: set[asyncio.Future] = set()

    # --- links --------------------------------------------------------------------------------
    def get(self, owner: str, backend: str) -> ComfyLink | None:
        link = self.links.get((owner, backend))
        return link if link is not None and not link.closed else None

    def of(self, owner: str) -> list[ComfyLink]:
        return [link for (o, _), link in self.links.items() if o == owner and not link.closed]

    def ensure(self, owner: str, backend: Backend) -> ComfyLink:
        link = self.get(owner, backend.name)
        if link is None:
            s = self.settings
            link = ComfyLink(owner, backend, self.client_ids(owner, backend.name), self,
                             max_message_size=s.upstream_max_message_bytes,
                             ping_interval=s.upstream_ping_interval_s,
                             reconnect_min=s.upstream_reconnect_min_ms / 1000,
                             reconnect_max=s.upstream_reconnect_max_ms / 1000,
                             preview_metadata=s.upstream_preview_metadata,
                             deliver=functools.partial(self.frames.upstream_frame, owner, backend.name))
            self.links[owner, backend.name] = link
            link.start()
        return link

    def ready(self, owner: str, backend: str) -> bool:
        link = self.get(owner, backend)
        return link is not None and link.ready.is_set()

    def release_idle_soon(self, owner: str) -> None:
        """Close the owner's links that are no longer wanted, once the current event is done."""
        self._later(0, lambda: self.release_idle(owner))

    def release_idle(self, owner: str) -> None:
        for (o, backend), link in list(self.links.items()):
            if o == owner and not self.keep(o, backend):
                self._close((o, backend))

    def _close(self, key: tuple[str, str]) -> None:
        link = self.links.pop(key, None)
        if link is not None:
            task = asyncio.ensure_future(link.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def wake(self, backend: Backend) -> None:
        """Skip the back-off of every link to ``backend`` (its breaker just closed)."""
        for (_, name), link in self.links.items():
            if name == backend.name:
                link.wake()

    def backend_unreachable(self, backend: Backend, since: float) -> None:
        for (_, name), link in list(self.links.items()):
            if name == backend.name and link.registered_at < since:
                link.recycle()

    def expect_status(self, link: ComfyLink, since: float) -> None:
        """After an accepted POST: recycle the link if no status broadcast follows."""
        def check() -> None:
            if self.links.get((link.owner, link.backend.name)) is link and link.ready.is_set() \
                    and link.last_status_at < since:
                log.warning("upstream socket is deaf (no status after a POST) user=%s: reconnecting", link.owner)
                link.recycle()
        self._later(self.deaf_after, check)

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        def run() -> None:
            self._handles.discard(handle)
            callback()
        handle = asyncio.get_running_loop().call_later(delay, run)
        self._handles.add(handle)

    # --- what the links tell (LinkSink) ---------------------------------------------------------
        # owns and is_running: the frame sink's own, bound in __init__; a link's frames go
        # straight to frames.upstream_frame, bound per link in ensure() (the relay's hot path)

    def link_frame(self, link: ComfyLink, routed: Routed, frame) -> None:
        self.frames.upstream_frame(link.owner, link.backend.name, routed, frame)

    def link_status(self, link: ComfyLink, text: str) -> None:
        self.frames.upstream_status(link.owner, text)

    def link_failed(self, link: ComfyLink) -> None:
        link.backend.websocket_failed_at = asyncio.get_running_loop().time()

    def link_up(self, link: ComfyLink, reconnected: bool) -> None:
        link.backend.websocket_up_at = asyncio.get_running_loop().time()
        caps = link.backend.capabilities
        if reconnected or caps is None or caps.remembered:  # (it may be back with other nodes or models)
            link.backend.refresh_soon()
        self.metrics.upstream_connections.inc()
        if reconnected:
            self.metrics.upstream_reconnects.inc()
        for listener in list(self.listeners):
            listener.link_up(link, reconnected)

    def link_down(self, link: ComfyLink) -> None:
        self.metrics.upstream_connections.dec()
        log.info("upstream socket lost user=%s backend=%s", link.owner, link.backend.name)
        for listener in list(self.listeners):
            listener.link_down(link)

    # --- lifecycle ------------------------------------------------------------------------------
    def all(self) -> Iterable[ComfyLink]:
        return list(self.links.values())

    async def close_all(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.close() for link in links), *self._closing, return_exceptions=True)
