"""The pool of enclave connections: several persistent connections per enclave, many enclaves.

Routing: by rendezvous hashing of a route key (the request's keyring) over the
live enclaves, so each keyring's data key is unwrapped and kept hot in one
enclave while it lives; within an enclave, to the connection with the least work.
Every enclave can serve every key (whoever owns the key store loads the wrapped
keyrings on the pool's connect event, before a new connection takes work), so a
lost enclave's work simply moves. Connections are supervised: reconnect with
jittered exponential backoff; requests on a lost connection are re-dispatched
to a live one. Each request is answered exactly once to its caller.

Poison requests (one request that crashes or hangs the enclave must not be
re-dispatched forever, nor take innocent requests down with it):

- A connection is lost (closed, hung past the heartbeat deadline, a protocol
  error). Each request the enclave had been sent on it and not answered counts
  one attempt; requests only queued there (never sent) count nothing and are
  re-dispatched as usual.
- A request with an attempt is a *suspect*: it is never again sent with other
  traffic, but alone - one suspect at a time per enclave, in a frame of its own,
  with nothing else in flight on any of that enclave's connections (a crash or a
  hang takes all of them down), on an enclave whose connections are all up (a
  loss still unfolding on a sibling connection must not be counted twice).
  So after the first loss, which may have been anyone's doing, a loss counts
  only against the one request that was in flight.
- At ``poison_attempts`` attempts the request is answered with status
  ``error``, code ``poison_request``, and never sent again. An ordinary request
  that shared a connection with a poison one therefore counts one attempt, is
  re-sent alone once and is answered; the poison request reaches the limit after
  exactly ``poison_attempts`` lost connections.
- At most half of the live enclaves (at least one) isolate suspects at a time;
  the others keep serving ordinary traffic, which avoids the isolating ones.
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
from schemas.refusals import Code
from schemas.sign_request import readable_ids
from schemas.sign_result import SignResult
from schemas.transport import parse_channel_url

from .channel import Batch, ChannelClosed, ChannelSettings, EnclaveConnection, Pending
from .metrics import HostMetrics

log = structlog.get_logger("pool")

ConnectListener = Callable[[EnclaveConnection], Awaitable[None]]


@dataclass(frozen=True)
class PoolSettings:
    connections_per_enclave: int = 2
    backoff_min_s: float = 0.05
    backoff_max_s: float = 2.0
    # the affine enclave has this many requests queued or in flight: spill to a less loaded enclave where the
    # keyring is warm; past cold_spill_factor times as many, also to one where it is cold (one KMS unwrap there)
    spill_after: int = 256
    cold_spill_factor: int = 4
    poison_attempts: int = 3  # a request in flight on this many lost connections is refused (poison_request)
    channel: ChannelSettings = field(default_factory=ChannelSettings)


class EnclavePool:
    def __init__(
        self,
        urls: list[str],
        settings: PoolSettings | None = None,
        metrics: HostMetrics | None = None,
    ):
        if not urls:
            raise ValueError("no enclave channel configured (SIGNER_ENCLAVES)")
        self.settings = settings or PoolSettings()
        if self.settings.poison_attempts < 2:
            raise ValueError("poison_attempts must be at least 2 (SIGNER_POISON_ATTEMPTS)")
        self.metrics = metrics or HostMetrics()
        self.groups: dict[str, list[EnclaveConnection]] = {}
        for url in urls:
            self.groups[url] = [
                # metric label: the address without link-shaping parameters, and the connection index
                EnclaveConnection(
                    url,
                    self.settings.channel,
                    self._on_lost,
                    self.metrics,
                    name=f"{parse_channel_url(url)}#{i}",
                    on_idle=self._on_idle,
                )
                for i in range(self.settings.connections_per_enclave)
            ]
            warm: set[str] = set()  # one set per enclave: what any of its connections signed for
            for conn in self.groups[url]:
                conn.warm = warm
        self._connect_listeners: list[ConnectListener] = []
        self._live_urls: list[str] = []
        self._affinity: dict[str, str] = {}  # key_id -> rendezvous choice among _live_urls
        self._spilled = 0  # requests spilled since the metric was last updated
        self.backlog: deque[Pending] = deque()  # accepted while no connection was live
        self.suspects: deque[Pending] = deque()  # in flight on a lost connection: to be re-sent alone
        # enclave URL -> (connection, suspect) it is sending alone, or None while its earlier work drains
        self._isolating: dict[str, tuple[EnclaveConnection, Pending] | None] = {}
        self._pumping = False
        self._pump_again = False
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self._up = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, ready_timeout: float | None = None) -> None:
        """Start supervising every connection; with a timeout, wait until one is live."""
        self._runner = asyncio.create_task(self._run(), name="enclave-pool")
        if ready_timeout is not None:
            async with asyncio.timeout(ready_timeout):
                await self._up.wait()

    async def wait_ready(self) -> None:
        await self._up.wait()

    def on_connect(self, listener: ConnectListener) -> None:
        """Run `listener` on every new connection, after the enclave's HELLO and before the connection
        takes work (e.g. load the enclave's keys into it); listeners run in the order they were added.
        A listener that fails with ChannelClosed (the connection went away) ends the preparation."""
        self._connect_listeners.append(listener)

    async def close(self) -> None:
        self._closing = True
        for conn in self.connections:
            conn.closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(BaseException):  # a runner that failed has said so (enclave_pool_failed)
                await self._runner
        for conn in self.connections:
            await conn.close()
        leftovers = list(self.backlog) + list(self.suspects)
        self.backlog.clear()
        self.suspects.clear()
        for p in leftovers:
            p.batch.fail(ChannelClosed("enclave pool closed"))

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for conn in self.connections:
                    tg.create_task(self._supervise(conn), name=f"supervise {conn.name}")
        except BaseException as exc:
            if not self._closing:  # a bug: every connection is down now, and nothing would bring them back
                log.error("enclave_pool_failed", error=repr(exc), exc_info=exc)
            raise

    async def watch(self) -> None:
        """Return never while the pool runs; raise if it stopped without being closed (a bug): the
        host must then fail (its uncommitted records go to the next owner), not wait forever."""
        runner = self._runner
        assert runner is not None, "start() first"
        await asyncio.wait([runner])  # never raises; returns once the runner has ended
        if not self._closing:
            failure = None if runner.cancelled() else runner.exception()
            raise RuntimeError(f"the enclave pool stopped: {failure!r}") from failure

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
            if not any(c.connected for c in self.groups[conn.url] if c is not conn):
                conn.warm.clear()  # the enclave was down (maybe restarted): its data keys may be cold
            serving = asyncio.create_task(conn.serve(), name=f"serve {conn.name}")
            try:
                with contextlib.suppress(ChannelClosed):
                    for listener in self._connect_listeners:
                        await listener(conn)
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
        return len(self.backlog) + len(self.suspects) + sum(len(c.queue) for c in self.connections)

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
        if self._spilled:
            self.metrics.spilled.inc(self._spilled)
            self._spilled = 0

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
        if self._isolating and url in self._isolating:
            url = self._instead_of_isolating(url)
        group = self.groups[url]
        best: EnclaveConnection | None = None
        load = 0  # requests queued or in flight on the enclave
        for c in group:
            if c.connected:
                load += c.load
                if best is None or c.load - c.credits < best.load - best.credits:
                    best = c
        if best is None:  # went down since the last refresh: hash again over what is live
            self._refresh_gauges()
            self.backlog.append(p)
            if self._live_urls:
                self._on_up()
            return
        if load >= self.settings.spill_after and len(self._live_urls) > 1:
            # the affine enclave is busy (one hot keyring is more than one enclave core can sign): spill to a
            # less loaded enclave that holds the keyring's data key; once the backlog is much larger, and the
            # keyring is warm here (a cold one is unwrapped by one enclave first), to any: it unwraps it once
            key = p.key_id
            cold_ok = load >= self.settings.spill_after * self.settings.cold_spill_factor and key in best.warm
            spill, least = None, best.load - best.credits
            for other in self._live_urls:
                if other == url or other in self._isolating:
                    continue
                for c in self.groups[other]:
                    if c.connected and c.load - c.credits < least and (cold_ok or key in c.warm):
                        spill, least = c, c.load - c.credits
            if spill is not None:
                self._spilled += 1  # counted into the metric once per batch (_refresh_gauges)
                best = spill
        best.enqueue(p)

    def _on_lost(self, conn: EnclaveConnection, sent: list[Pending], unsent: list[Pending]) -> None:
        """A connection was lost: count an attempt for what the enclave had been sent; re-dispatch the rest."""
        self._refresh_gauges()
        if self._closing:
            for p in (*sent, *unsent):
                p.batch.fail(ChannelClosed("enclave pool closed"))
            return
        isolated = self._isolating.get(conn.url)
        if isolated is not None and isolated[0] is conn:
            self._isolating[conn.url] = None  # its suspect came back with the connection
        redispatched = 0
        for p in sent:
            if p.settled:
                continue
            p.attempts += 1
            if p.attempts >= self.settings.poison_attempts:
                self._poison(p, conn)
                continue
            redispatched += 1
            if p.attempts > 1:
                self.suspects.appendleft(p)  # lost again while alone: try it again first
            else:
                self.suspects.append(p)
        for p in unsent:
            if p.settled:
                continue
            redispatched += 1
            if p.attempts:
                self.suspects.appendleft(p)  # a suspect that was not sent yet
            else:
                self._route(p)
        if redispatched:
            self.metrics.redispatched.inc(redispatched)
        self._pump()

    def _poison(self, p: Pending, conn: EnclaveConnection) -> None:
        request_id, key_id = _ids_of(p.raw)
        message = (
            f"refused: {p.attempts} enclave connections were lost while this request was in flight, the last "
            f"{p.attempts - 1} with no other request in flight on the enclave (last: {conn.closed_reason[:200]}); "
            "it is not sent to an enclave again"
        )
        self.metrics.poison_requests.labels(conn.lost_cause or "error").inc()
        log.warning("poison_request", request_id=request_id, attempts=p.attempts, channel=conn.name,
                    reason=conn.closed_reason[:200])  # fmt: skip
        p.batch.resolve(p.index, SignResult.failure(request_id, key_id, Code.POISON_REQUEST, message).to_wire())

    def _on_up(self) -> None:
        self._up.set()
        self._refresh_gauges()
        pending, self.backlog = self.backlog, deque()
        for p in pending:
            self._route(p)
        self._pump()

    # -- isolating suspects (see the module docstring) -------------------------------------

    def _on_idle(self, conn: EnclaveConnection) -> None:
        """A held connection has nothing left in flight."""
        if conn.url in self._isolating:
            self._pump()

    def _next_suspect(self) -> Pending | None:
        while self.suspects and self.suspects[0].settled:
            self.suspects.popleft()
        return self.suspects[0] if self.suspects else None

    def _whole(self, url: str) -> bool:
        return all(c.connected for c in self.groups[url])

    def _url_load(self, url: str) -> int:
        return sum(c.load - c.credits for c in self.groups[url] if c.connected)

    def _instead_of_isolating(self, url: str) -> str:
        """Ordinary work for an isolating enclave goes to the least loaded other one, if any."""
        others = [u for u in self._live_urls if u not in self._isolating]
        return min(others, key=self._url_load) if others else url

    def _pump(self) -> None:
        """Move suspects on: each isolating enclave sends one at a time, alone; recruit or release enclaves."""
        if self._closing:
            return
        if self._pumping:  # re-entered (routing can bring a connection up): the running pump goes round again
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        for url, out in list(self._isolating.items()):
            if out is not None:
                if not out[1].settled:
                    continue  # its suspect is still out: wait for the answer or the loss
                self._isolating[url] = None
            if not self._whole(url) or self._next_suspect() is None:
                self._release(url)  # a loss there may still be unfolding, or nothing is left to isolate
                continue
            conns = self.groups[url]
            if any(c.inflight or c.sending_alone for c in conns):
                continue  # earlier work still in flight: the held connections report when it is done
            p = self.suspects.popleft()
            conn = max(conns, key=lambda c: c.credits)
            self._isolating[url] = (conn, p)
            conn.send_alone(p)
        # recruit enclaves for the suspects still waiting: at most half of the live ones (at least one)
        slots = max(1, len(self._live_urls) // 2)
        free = sum(1 for out in self._isolating.values() if out is None)  # each takes one when drained
        while len(self.suspects) > free and len(self._isolating) < slots:
            ready = [u for u in self._live_urls if u not in self._isolating and self._whole(u)]
            if not ready:
                break
            self._isolate(min(ready, key=self._url_load))
            free += 1
            self._pump_again = True

    def _isolate(self, url: str) -> None:
        log.info("enclave_isolating", url=str(parse_channel_url(url)), suspects=len(self.suspects))
        self._isolating[url] = None
        moved: list[Pending] = []
        for c in self.groups[url]:
            c.hold(True)
            moved += c.take_queue()
        for p in moved:  # ordinary work queued there moves to an enclave that is not isolating, if any
            self._route(p)

    def _release(self, url: str) -> None:
        del self._isolating[url]
        for c in self.groups[url]:
            c.hold(False)

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
        conn = min(live, key=lambda c: (c.key_ops_waiting, c.load))
        reply = await conn.key_op(op, args)
        return {**reply, "enclave_id": conn.enclave_id, "url": conn.url}

    async def broadcast(self, op: str, args: dict[str, Any], exclude_url: str | None = None) -> None:
        """A key operation on every live enclave (one connection each), e.g. loading a new keyring."""
        for url in self.groups:
            live = self.live(url)
            if live and url != exclude_url:
                with contextlib.suppress(ChannelClosed):
                    await live[0].key_op(op, args)


def _ids_of(raw: bytes) -> tuple[str, str]:
    """The request id and key id of an encoded SignRequest, as far as they can be read."""
    request_id, key_id, _ = readable_ids(raw)
    return request_id or "", key_id or ""


def _score(key_id: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{url}|{key_id}".encode(), digest_size=8).digest(), "big")
