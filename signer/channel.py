"""One persistent, multiplexed connection to an enclave worker.

The connection is the seam between "what" (batches of requests) and "how bytes
move" (a schemas.transport Transport: vsock, unix or tcp chosen by URL, possibly
behind an emulated link, or any other given one): nothing above it knows which
transport it talks to.

- Requests are queued and coalesced into ``sign`` frames bounded by count,
  bytes and a small time window, never beyond the enclave's credits.
- Frames from the enclave are decoded into typed frames (schemas.frames) and handed
  to their handler from one table; any other frame drops the connection.
- Results come back in batches and are matched to their requests by correlation id.
- Heartbeats: a ping every interval; no frame at all from the enclave for
  ``dead_after_s`` means hung or dead, and the connection is dropped.
- On loss, every request queued or in flight is handed back (``on_lost``, the
  ones the enclave had been sent apart from the ones it never saw) so the pool
  can re-dispatch them or, when they keep killing connections, refuse them:
  callers see exactly one result per request.
- Isolation: the pool can hold a connection (nothing queued is sent) and send a
  single request on it alone (``send_alone``), in a frame of its own; it is told
  when a held connection has nothing left in flight (``on_idle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import structlog

from schemas import frames
from schemas.transport import Transport, transport_for

from .metrics import HostMetrics

log = structlog.get_logger("channel")


class ChannelClosed(ConnectionError):
    """The connection to the enclave is gone; the operation was not answered on it."""


class _Lost(Exception):
    def __init__(self, reason: str, cause: str = "error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause  # "closed" (the enclave closed it), "hung" (no frame in time) or "error"


class Batch:
    """The results of one submission, in request order; awaitable, done when all are answered.

    One future per batch rather than per request: on the hot path a future, its
    callback and a gather() per request cost more than moving the request.
    """

    __slots__ = ("future", "remaining", "results")

    def __init__(self, n: int) -> None:
        self.results: list[dict[str, Any] | None] = [None] * n
        self.remaining = n
        self.future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        if n == 0:
            self.future.set_result([])

    def resolve(self, index: int, result: dict[str, Any]) -> None:
        """Record a request's result; a second answer for the same request is ignored."""
        if self.results[index] is not None:
            return
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.results)  # type: ignore[arg-type]

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            # a batch abandoned at shutdown may have no one left awaiting it: do not warn about that
            self.future.add_done_callback(lambda f: f.exception())

    @property
    def answered(self) -> int:
        return len(self.results) - self.remaining

    def __await__(self) -> Generator[Any, None, list[dict[str, Any]]]:
        return self.future.__await__()


@dataclass(slots=True)
class Pending:
    """One request on its way to an enclave; its result goes to batch.results[index], once."""

    key_id: str  # the route key (the request's keyring, else its key id)
    raw: bytes  # the SignRequest exactly as the producer encoded it
    batch: Batch
    index: int
    sent_at: float = 0.0
    attempts: int = 0  # connections lost while this request was in flight on them
    enqueued_at: float = 0.0

    @property
    def settled(self) -> bool:
        return self.batch.results[self.index] is not None or self.batch.future.done()


@dataclass(frozen=True)
class ChannelSettings:
    max_batch: int = 512  # requests per frame
    max_batch_bytes: int = 1024 * 1024  # request bytes per frame
    # 0 (default): a frame is whatever queued since the connection last sent - at once when it is
    # idle, and while it is busy whatever arrives meanwhile (a fetched batch is queued whole), so
    # frames grow with load and no fixed wait is on the path. > 0: while frames are in flight, a
    # frame that is not full first waits this long for more (fewer, larger frames; more latency)
    batch_window_s: float = 0.0
    heartbeat_interval_s: float = 1.0
    dead_after_s: float = 5.0  # no frame at all from the enclave this long: hung or dead
    hello_timeout_s: float = 5.0
    max_frame_bytes: int = frames.MAX_FRAME_BYTES


@dataclass
class _Stats:
    frames_out: int = 0
    requests_out: int = 0
    connects: int = 0


class EnclaveConnection:
    def __init__(
        self,
        url: str,
        settings: ChannelSettings,
        on_lost: Callable[[EnclaveConnection, list[Pending], list[Pending]], None],
        metrics: HostMetrics | None = None,
        name: str = "",
        on_idle: Callable[[EnclaveConnection], None] | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.url = url
        self.transport = transport if transport is not None else transport_for(url)
        self.settings = settings
        self.name = name or url
        self.enclave_id = ""
        self.credits = 0
        self.metrics = metrics or HostMetrics()
        self.stats = _Stats()
        self.queue: deque[Pending] = deque()
        self.inflight: dict[int, Pending] = {}
        self.held = False  # the pool isolates this connection: nothing from the queue is sent
        self._alone: deque[Pending] = deque()  # requests to send each in a frame of its own, even when held
        self._on_lost = on_lost
        self._on_idle = on_idle
        self._key_ops: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # the enclave drops a connection with more key operations in flight than this: wait for a slot
        self._key_op_slots = asyncio.Semaphore(frames.MAX_KEY_OPS_IN_FLIGHT)
        self.key_ops_waiting = 0  # key operations in flight or waiting for a slot
        # what each frame from the enclave is for; any other frame is refused
        self._handlers: dict[type[frames.Frame], Callable[[Any], None]] = {
            frames.ResultsFrame: self._on_results,
            frames.PongFrame: self._on_pong,
            frames.KeyOpResultFrame: self._on_key_op_result,
            frames.ErrorFrame: self._on_error,
        }
        self._ids = itertools.count(1)
        self._work = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_rx = 0.0
        self.connected = False
        self.closed_reason = "not connected"
        self.lost_cause = ""  # how the last loss happened: "closed", "hung" or "error"
        self.closing = False
        self.enclave_stats: dict[str, Any] = {}  # counters the enclave reports with each pong
        # route keys (keyrings) this enclave has signed for since it came up: their data key is warm there
        # (the pool shares one set between an enclave's connections)
        self.warm: set[str] = set()
        self._labels = {"channel": self.name}
        m = self.metrics
        self._m_credits = m.credits.labels(**self._labels)
        self._m_frames_in = m.frames.labels(direction="in", **self._labels)
        self._m_frames_out = m.frames.labels(direction="out", **self._labels)
        self._m_bytes_out = m.frame_bytes.labels(direction="out", **self._labels)

    # -- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the transport and read HELLO; raises on failure (the pool retries)."""
        reader, writer = await self.transport.connect()
        try:
            async with asyncio.timeout(self.settings.hello_timeout_s):
                hello = await frames.receive_frame(reader, self.settings.max_frame_bytes)
            if type(hello) is not frames.HelloFrame or hello.proto != frames.PROTOCOL_VERSION:
                proto = hello.proto if type(hello) is frames.HelloFrame else None
                raise ChannelClosed(f"{self.url}: bad HELLO (type {hello.TYPE!r}, protocol {proto!r})")
        except BaseException:
            writer.close()
            raise
        frames.limit_write_buffer(writer)
        self._reader, self._writer = reader, writer
        self.enclave_id = hello.enclave_id
        credits = self.credits = hello.credits
        self._last_rx = asyncio.get_running_loop().time()
        self.connected = True
        self.closed_reason = ""
        self.stats.connects += 1
        self._m_credits.set(credits)
        log.info("channel_connected", channel=self.name, enclave_id=self.enclave_id, credits=credits)

    async def serve(self) -> str:
        """Run the connection until it is lost; hand back unanswered requests; return the reason."""
        assert self._reader is not None and self._writer is not None
        reason, cause = "closed", "closed"
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._send_loop())
                tg.create_task(self._read_loop(self._reader))
                tg.create_task(self._ping_loop())
                tg.create_task(self._watchdog())
        except* _Lost as group:
            lost = group.exceptions[0]
            reason, cause = str(lost), lost.cause if isinstance(lost, _Lost) else "error"
        except* (ConnectionError, OSError) as group:
            reason, cause = f"transport error: {group.exceptions[0]!r}", "error"
        except* frames.FrameError as group:
            reason, cause = f"bad frame from enclave: {group.exceptions[0]}", "error"
        except* Exception as group:  # a bug on this side: said with its traceback, and it fails the pool
            reason, cause = f"internal error: {group.exceptions[0]!r}", "error"
            log.error("channel_internal_error", channel=self.name, error=reason, exc_info=group.exceptions[0])
            raise
        finally:
            self._drop(reason, cause)
        return reason

    def _drop(self, reason: str, cause: str = "error") -> None:
        if not self.connected and self.closed_reason:
            return
        self.connected = False
        self.closed_reason = reason
        self.lost_cause = cause
        self.credits = 0
        self._m_credits.set(0)
        if self._writer is not None:
            self._writer.close()
        for fut in self._key_ops.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{self.url}: {reason}"))
        self._key_ops.clear()
        sent = list(self.inflight.values())  # the enclave had these: they may have caused the loss
        unsent = list(self._alone) + list(self.queue)  # never reached the enclave
        self.inflight.clear()
        self._alone.clear()
        self.queue.clear()
        if self.closing:
            log.info("channel_closed", channel=self.name, unanswered=len(sent) + len(unsent))
        else:
            log.warning("channel_lost", channel=self.name, reason=reason, in_flight=len(sent), queued=len(unsent))
        self._on_lost(self, sent, unsent)

    async def close(self) -> None:
        self.closing = True
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    # -- work in ------------------------------------------------------------------------

    @property
    def load(self) -> int:
        """Requests queued or in flight on this connection."""
        return len(self.queue) + len(self.inflight)

    def enqueue(self, pending: Pending) -> None:
        pending.enqueued_at = time.perf_counter()
        self.queue.append(pending)
        if self.credits > 0 and not self.held:
            self._work.set()

    def send_alone(self, pending: Pending) -> None:
        """Send this request in a frame of its own, even while the connection is held."""
        pending.enqueued_at = time.perf_counter()
        self._alone.append(pending)
        self._kick()

    @property
    def sending_alone(self) -> bool:
        """A request given to send_alone has not been sent yet."""
        return bool(self._alone)

    def hold(self, held: bool) -> None:
        """Held: requests queued here wait (send_alone still sends); released: they go out."""
        self.held = held
        self._kick()

    def take_queue(self) -> list[Pending]:
        """Remove and return the requests queued and not yet sent."""
        out = list(self.queue)
        self.queue.clear()
        return out

    def _sendable(self) -> bool:
        return self.credits > 0 and (bool(self._alone) or (bool(self.queue) and not self.held))

    def _kick(self) -> None:
        if self._sendable():
            self._work.set()

    async def key_op(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One key operation, answered on this connection; at most MAX_KEY_OPS_IN_FLIGHT at once (the
        rest wait their turn, as the enclave drops a connection that sends more)."""
        self.key_ops_waiting += 1
        try:
            async with self._key_op_slots:
                return await self._key_op(op, args)
        finally:
            self.key_ops_waiting -= 1

    async def _key_op(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if not self.connected:
            raise ChannelClosed(f"{self.url}: {self.closed_reason}")
        op_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._key_ops[op_id] = fut
        await self._write(frames.KeyOpFrame(op_id, op, args).encode())
        return await fut

    # -- tasks --------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        s = self.settings
        while True:
            await self._work.wait()
            if not self._sendable():
                self._work.clear()
                continue
            if (not self._alone and s.batch_window_s > 0 and self.inflight
                    and len(self.queue) < min(s.max_batch, self.credits)):  # fmt: skip
                # the optional fixed window: only while the enclave is busy with earlier frames
                await asyncio.sleep(s.batch_window_s)
                if not self._sendable():  # held (or drained) meanwhile
                    continue
            items: list[list[Any]] = []
            waits: list[float] = []
            size = 0
            now = time.perf_counter()
            if self._alone:  # an isolated request: a frame of its own
                source, n_max = self._alone, 1
            else:
                source, n_max = self.queue, min(s.max_batch, self.credits, len(self.queue))
            while len(items) < n_max:
                p = source[0]
                if items and size + len(p.raw) > s.max_batch_bytes:
                    break
                source.popleft()
                corr_id = next(self._ids)
                p.sent_at = now
                waits.append(now - p.enqueued_at)
                self.inflight[corr_id] = p
                items.append([corr_id, p.raw])
                size += len(p.raw)
            self.credits -= len(items)
            if not self._sendable():
                self._work.clear()
            if not items:
                continue
            data = frames.SignFrame(items).encode(s.max_frame_bytes)
            self.stats.frames_out += 1
            self.stats.requests_out += len(items)
            self._m_frames_out.inc()
            self._m_bytes_out.inc(len(data))
            self.metrics.batch_size.observe(self.name, len(items))
            self.metrics.stage.observe_many("credit_wait", waits)
            self.metrics.channel_stage.observe_many((self.enclave_id, "credit_wait"), waits)
            self._m_credits.set(self.credits)
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        writer = self._writer
        assert writer is not None
        async with self._write_lock:
            if writer.is_closing():  # lost meanwhile (the peer reset it, or _drop closed it)
                raise ChannelClosed(f"{self.url}: connection closed")
            try:
                await frames.write_frame(writer, data)
            except RuntimeError as exc:  # uvloop: a write to a transport that has closed is a RuntimeError
                if writer.is_closing():
                    raise ChannelClosed(f"{self.url}: connection closed ({exc})") from None
                raise

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        handlers = self._handlers
        max_bytes = self.settings.max_frame_bytes
        while True:
            try:
                frame = await frames.receive_frame(reader, max_bytes)
            except asyncio.IncompleteReadError:
                raise _Lost("enclave closed the connection", "closed") from None
            self._last_rx = loop.time()
            handler = handlers.get(type(frame))
            if handler is None:
                raise frames.unexpected(frame)
            handler(frame)

    def _on_pong(self, frame: frames.PongFrame) -> None:
        if frame.stats is not None:
            self.enclave_stats = frame.stats

    def _on_key_op_result(self, frame: frames.KeyOpResultFrame) -> None:
        fut = self._key_ops.pop(frame.id, None)
        if fut is not None and not fut.done():
            fut.set_result(frame.to_wire())

    def _on_error(self, frame: frames.ErrorFrame) -> None:
        raise _Lost(f"enclave error {frame.code}: {frame.message[:200]}")

    def _on_results(self, frame: frames.ResultsFrame) -> None:
        now = time.perf_counter()
        inflight = self.inflight
        service: list[float] = []
        transfer: list[float] = []
        for corr_id, result in frame.items:  # [int, map] each (checked when decoded)
            p = inflight.pop(corr_id, None)
            if p is None:
                continue  # not ours (never sent, or already answered): ignore, never double-deliver
            timings = result.get("timings_us")
            svc = timings.get("enclave_service", 0) / 1e6 if type(timings) is dict else 0.0
            service.append(svc)
            transfer.append(max(0.0, now - p.sent_at - svc))
            if result.get("status") == "ok":
                self.warm.add(p.key_id)
            p.batch.resolve(p.index, result)
        m = self.metrics
        m.stage.observe_many("enclave_service", service)
        m.stage.observe_many("channel_transfer", transfer)
        m.channel_stage.observe_many((self.enclave_id, "enclave_service"), service)
        m.channel_stage.observe_many((self.enclave_id, "channel_transfer"), transfer)
        self._m_frames_in.inc()
        self.credits += frame.credits
        self._m_credits.set(self.credits)
        self._kick()
        if self.held and not self.inflight and self._on_idle is not None:
            self._on_idle(self)

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self._write(frames.PingFrame(next(self._ids)).encode())

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        while True:
            await asyncio.sleep(min(s.heartbeat_interval_s, s.dead_after_s) / 2)
            silent = loop.time() - self._last_rx
            if silent > s.dead_after_s:
                raise _Lost(f"no frame from the enclave for {silent:.1f}s (hung or dead)", "hung")
