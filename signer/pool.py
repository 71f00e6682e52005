"""The pool of enclave connections: several persistent connections per enclave, many enclaves.

Routing: by rendezvous hashing of a route key (the request's keyring) over the
live enclaves, so each keyring's data key is unwrapped and kept hot in one
enclave while it lives; within an enclave, to the connection with the least work.
Every enclave can serve every key (it loads the wrapped keyrings when a
connection comes up), so a lost enclave's work simply moves. Connections are supervised: reconnect with
jittered exponential backoff; requests on a lost connection are re-dispatched
to a live one. Each request is answered exactly once to its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from schemas import frames
from schemas.transport import parse_channel_url

from .channel import Batch, ChannelClosed, ChannelSettings, EnclaveConnection, Pending
from .metrics import HostMetrics

log = structlog.get_logger("pool")


@dataclass(frozen=True)
class PoolSettings:
    connections_per_enclave: int = 2
    backoff_min_s: float = 0.05
    backoff_max_s: float = 2.0
    max_queued: int = 20_000  # requests accepted but not yet sent; above this, callers wait
    spill_after: int = 1024  # the affine enclave has this many queued beyond its credits: use the least loaded
    channel: ChannelSettings = field(default_factory=ChannelSettings)


class EnclavePool:
    def __init__(
        self,
        urls: list[str],
        settings: PoolSettings | None = None,
        metrics: HostMetrics | None = None,
        prepare: Callable[[EnclaveConnection], Awaitable[None]] | None = None,
    ):
        if not urls:
            raise ValueError("no enclave channel configured (SIGNER_ENCLAVES)")
        self.settings = settings or PoolSettings()
        self.metrics = metrics or HostMetrics()
        self.groups: dict[str, list[EnclaveConnection]] = {}
        for url in urls:
            self.groups[url] = [
                # metric label: the address without link-shaping parameters, and the connection index
                EnclaveConnection(
                    url, self.settings.channel, self._on_lost, self.metrics, name=f"{parse_channel_url(url)}#{i}"
                )
                for i in range(self.settings.connections_per_enclave)
            ]
        self._prepare = prepare  # runs on every new connection before it takes work
        self._live_urls: list[str] = []
        self._affinity: dict[str, str] = {}  # key_id -> rendezvous choice among _live_urls
        self.backlog: deque[Pending] = deque()  # accepted while no connection was live
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._capacity = asyncio.Event()
        self._capacity.set()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, ready_timeout: float | None = None) -> None:
        """Start supervising every connection; with a timeout, wait until one is live."""
        self._runner = asyncio.create_task(self._run(), name="enclave-pool")
        if ready_timeout is not None:
            async with asyncio.timeout(ready_timeout):
                await self._up.wait()

    async def wait_ready(self) -> None:
        await self._up.wait()

    async def close(self) -> None:
        self._closing = True
        for conn in self.connections:
            conn.closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for conn in self.connections:
            await conn.close()
        leftovers = list(self.backlog)
        self.backlog.clear()
        for p in leftovers:
            p.batch.fail(ChannelClosed("enclave pool closed"))

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for conn in self.connections:
                tg.create_task(self._supervise(conn), name=f"supervise {conn.name}")

    async def _supervise(self, conn: EnclaveConnection) -> None:
        s = self.settings
        delay = s.backoff_min_s
        while not self._closing:
            try:
                await conn.connect()
            except (OSError, ChannelClosed, TimeoutError, frames.FrameError, asyncio.IncompleteReadError) as exc:
                log.debug("channel_connect_failed", channel=conn.name, error=repr(exc))
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # jittered exponential backoff
                delay = min(delay * 2, s.backoff_max_s)
                continue
            delay = s.backoff_min_s
            serving = asyncio.create_task(conn.serve(), name=f"serve {conn.name}")
            try:
                if self._prepare is not None:
                    with contextlib.suppress(ChannelClosed):
                        await self._prepare(conn)
                self._on_up()
                await serving
            finally:
                if not serving.done():
                    serving.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await serving
            if not self._closing:
                self.metrics.reconnects.inc()
                self._refresh_gauges()

    # -- state -------------------------------------------------------------------------

    @property
    def connections(self) -> list[EnclaveConnection]:
        return [c for group in self.groups.values() for c in group]

    def live(self, url: str | None = None) -> list[EnclaveConnection]:
        conns = self.groups.get(url, []) if url is not None else self.connections
        return [c for c in conns if c.connected]

    @property
    def queued(self) -> int:
        """Requests accepted and not yet sent to an enclave."""
        return len(self.backlog) + sum(len(c.queue) for c in self.connections)

    @property
    def in_flight(self) -> int:
        return sum(len(c.inflight) for c in self.connections)

    @property
    def saturated(self) -> bool:
        """No live connection has credit: the dispatcher should stop taking work."""
        return not any(c.credits > 0 for c in self.live())

    def _refresh_gauges(self) -> None:
        live_urls = [url for url in self.groups if self.live(url)]
        if live_urls != self._live_urls:
            self._live_urls = live_urls
            self._affinity.clear()  # the set of enclaves changed: hash again
        self.metrics.enclaves_connected.set(len(live_urls))
        if self.queued < self.settings.max_queued:
            self._capacity.set()
        else:
            self._capacity.clear()

    async def wait_capacity(self) -> None:
        """Return when the pool accepts more work (bounded memory, however far producers run ahead)."""
        self._refresh_gauges()
        await self._capacity.wait()

    # -- work ----------------------------------------------------------------------------

    def submit_many(self, items: list[tuple[str, bytes]]) -> Batch:
        """Queue SignRequests (route key, encoded bytes); await the Batch for their results, in order."""
        batch = Batch(len(items))
        if self._closing:
            batch.fail(ChannelClosed("enclave pool closed"))
            return batch
        route = self._route
        for i, (key_id, raw) in enumerate(items):
            route(Pending(key_id, raw, batch, i))
        self._refresh_gauges()
        return batch

    async def sign(self, route_key: str, raw: bytes) -> dict[str, Any]:
        """One request; for convenience (the hot path submits batches)."""
        return (await self.submit_many([(route_key, raw)]))[0]

    def affinity(self, route_key: str) -> str | None:
        """The live enclave URL a route key (keyring) maps to, by rendezvous hashing."""
        url = self._affinity.get(route_key)
        if url is None:
            if not self._live_urls:
                return None
            url = max(self._live_urls, key=lambda u: _score(route_key, u))
            if len(self._affinity) > 100_000:
                self._affinity.clear()
            self._affinity[route_key] = url
        return url

    def _route(self, p: Pending) -> None:
        url = self.affinity(p.key_id)
        if url is None:
            self.backlog.append(p)
            return
        conns = [c for c in self.groups[url] if c.connected]
        if not conns:  # went down since the last refresh: hash again over what is live
            self._refresh_gauges()
            self.backlog.append(p)
            if self._live_urls:
                self._on_up()
            return
        best = min(conns, key=lambda c: c.load - c.credits)
        if len(best.queue) - best.credits >= self.settings.spill_after and len(self._live_urls) > 1:
            # the affine enclave is saturated: spill to the least loaded one (it unwraps the keyring once)
            others = [c for c in self.live() if c.url != url]
            spill = min(others, key=lambda c: c.load - c.credits)
            if spill.load - spill.credits < best.load - best.credits:
                self.metrics.spilled.inc()
                best = spill
        best.enqueue(p)

    def _on_lost(self, conn: EnclaveConnection, unanswered: list[Pending]) -> None:
        self._refresh_gauges()
        if self._closing:
            for p in unanswered:
                p.batch.fail(ChannelClosed("enclave pool closed"))
            return
        if unanswered:
            self.metrics.redispatched.inc(len(unanswered))
        for p in unanswered:
            if p.settled:
                continue
            p.attempts += 1
            self._route(p)

    def _on_up(self) -> None:
        self._up.set()
        self._refresh_gauges()
        pending, self.backlog = self.backlog, deque()
        for p in pending:
            self._route(p)

    # -- key management ----------------------------------------------------------------------

    async def key_op(
        self, op: str, args: dict[str, Any], route_key: str | None = None, enclave_id: str | None = None
    ) -> dict[str, Any]:
        """A key operation on one enclave: the named one, the route key's, or the least loaded."""
        live = self.live()
        if enclave_id is not None:
            live = [c for c in live if c.enclave_id == enclave_id]
        elif route_key is not None and (url := self.affinity(route_key)) is not None:
            live = self.live(url) or live
        if not live:
            raise ChannelClosed(f"no enclave connected{f' with id {enclave_id}' if enclave_id else ''}")
        conn = min(live, key=lambda c: c.load)
        reply = await conn.key_op(op, args)
        return {**reply, "enclave_id": conn.enclave_id, "url": conn.url}

    async def broadcast(self, op: str, args: dict[str, Any], exclude_url: str | None = None) -> None:
        """A key operation on every live enclave (one connection each), e.g. loading a new keyring."""
        for url in self.groups:
            live = self.live(url)
            if live and url != exclude_url:
                with contextlib.suppress(ChannelClosed):
                    await live[0].key_op(op, args)


def _score(key_id: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{url}|{key_id}".encode(), digest_size=8).digest(), "big")
