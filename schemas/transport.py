"""Channel transports: how bytes move between a host and an enclave worker.

A ``Transport`` hands out asyncio streams: ``connect()`` opens one connection
(the host), ``serve(handler)`` runs the handler on every accepted one (the
enclave worker). Nothing above it knows which transport carries the bytes
(httpx's transport seam is the model). Implementations:

- ``UnixTransport``, ``TcpTransport``, ``VsockTransport``: sockets. AF_VSOCK is only
  as thick as creating the socket (a factory, the seam unit tests use: AF_VSOCK is
  never bound or connected on development machines); asyncio takes the ready socket
  via ``sock=`` (getaddrinfo knows no vsock).
- ``ShapedTransport(inner, LinkShaping)``: any transport behind an emulated slow
  link (added latency, a bandwidth cap), to reproduce a slow vsock on a laptop.
- ``MemoryTransport``: streams connected in-process, for unit tests.

``transport_for(url)`` is the one place a URL becomes a transport:
``vsock://CID:PORT``, ``unix:///path`` or ``tcp://host:port``, the last two optionally
with ``?latency_ms=N&bandwidth_mbps=M`` (a ShapedTransport around them).

``LinkTransport`` is the base of transports that carry another transport's bytes
themselves (shaping here; corrupting or recording them in tests): the caller gets
one end of an in-memory pipe, and ``carry`` moves the bytes between it and the
inner transport's streams.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from .frames import WRITE_CHUNK_BYTES

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class TransportUrlError(ValueError):
    """A channel URL that names no usable transport."""


class Server(Protocol):
    """What ``Transport.serve`` returns (asyncio.Server is one)."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...

    async def serve_forever(self) -> None: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc: object) -> None: ...


class Transport(abc.ABC):
    """Opens connections to a peer, or serves them; str() names it for logs."""

    @abc.abstractmethod
    async def connect(self) -> Streams:
        """One new connection to the peer."""

    @abc.abstractmethod
    async def serve(self, handler: StreamHandler) -> Server:
        """Accept connections, running ``handler(reader, writer)`` in a task of its own for each."""


# -- URLs ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkShaping:
    """Emulated link limits (unix/tcp only): added one-way latency and a bandwidth cap."""

    latency_s: float = 0.0
    bandwidth_bps: float = 0.0  # bytes per second; 0 = unlimited

    @property
    def active(self) -> bool:
        return self.latency_s > 0 or self.bandwidth_bps > 0

    def query(self) -> str:
        """The URL parameters that describe this shaping ("" when there is none)."""
        parts = []
        if self.latency_s > 0:
            parts.append(f"latency_ms={self.latency_s * 1000:g}")
        if self.bandwidth_bps > 0:
            parts.append(f"bandwidth_mbps={self.bandwidth_bps * 8 / 1e6:g}")
        return "&".join(parts)


@dataclass(frozen=True, slots=True)
class ChannelAddress:
    scheme: str  # "vsock" | "unix" | "tcp"
    host: str = ""
    port: int = 0
    path: str = ""
    cid: int = 0
    shaping: LinkShaping = LinkShaping()

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        if self.scheme == "vsock":
            return f"vsock://{self.cid}:{self.port}"
        return f"tcp://{self.host}:{self.port}"


_SHAPING_KEYS = {"latency_ms", "bandwidth_mbps"}


def _shaping(url: str, query: str, scheme: str) -> LinkShaping:
    if not query:
        return LinkShaping()
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(params) - _SHAPING_KEYS
    if unknown:
        raise TransportUrlError(f"{url!r}: unknown parameters {sorted(unknown)}, expected {sorted(_SHAPING_KEYS)}")
    if scheme == "vsock":
        raise TransportUrlError(f"{url!r}: link shaping is for emulated links (unix://, tcp://) only")
    try:
        latency_ms = float(params.get("latency_ms", 0))
        mbps = float(params.get("bandwidth_mbps", 0))
    except ValueError:
        raise TransportUrlError(f"{url!r}: latency_ms and bandwidth_mbps must be numbers") from None
    if latency_ms < 0 or mbps < 0:
        raise TransportUrlError(f"{url!r}: latency_ms and bandwidth_mbps must not be negative")
    return LinkShaping(latency_ms / 1000.0, mbps * 1e6 / 8)


def parse_channel_url(url: str) -> ChannelAddress:
    """vsock://CID:PORT, unix:///path or tcp://host:port, optionally with
    ?latency_ms=N&bandwidth_mbps=M on emulated links."""
    parts = urlsplit(url)
    shaping = _shaping(url, parts.query, parts.scheme)
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path.startswith("/"):
            raise TransportUrlError(f"{url!r}: unix URLs take an absolute path, unix:///run/x.sock")
        return ChannelAddress("unix", path=path, shaping=shaping)
    if parts.scheme in ("tcp", "vsock"):
        try:
            port = parts.port
        except ValueError:
            raise TransportUrlError(f"{url!r}: the port is not a number") from None
        if port is None or not parts.hostname:
            raise TransportUrlError(f"{url!r}: expected {parts.scheme}://HOST:PORT")
        if parts.scheme == "tcp":
            return ChannelAddress("tcp", host=parts.hostname, port=port, shaping=shaping)
        try:
            cid = int(parts.hostname)
        except ValueError:
            raise TransportUrlError(f"{url!r}: the vsock CID must be a number") from None
        if not 0 <= cid <= 0xFFFFFFFF or not 0 <= port <= 0xFFFFFFFF:
            raise TransportUrlError(f"{url!r}: CID and port are 32-bit unsigned numbers")
        return ChannelAddress("vsock", cid=cid, port=port)
    raise TransportUrlError(f"{url!r}: unknown transport, expected vsock://, unix:// or tcp://")


def transport_for(url: str) -> Transport:
    """The transport a channel URL names (a ShapedTransport around it when the URL shapes the link)."""
    addr = parse_channel_url(url)
    transport = _BY_SCHEME[addr.scheme](addr)
    return ShapedTransport(transport, addr.shaping) if addr.shaping.active else transport


async def open_channel(url: str) -> Streams:
    """One connection to the transport a URL names."""
    return await transport_for(url).connect()


async def serve_channel(url: str, handler: StreamHandler) -> Server:
    """Serve on the transport a URL names."""
    return await transport_for(url).serve(handler)


# -- sockets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnixTransport(Transport):
    path: str

    def __str__(self) -> str:
        return f"unix://{self.path}"

    async def connect(self) -> Streams:
        return await asyncio.open_unix_connection(self.path)

    async def serve(self, handler: StreamHandler) -> Server:
        if os.path.exists(self.path):  # noqa: ASYNC240 - once, before serving
            os.unlink(self.path)  # a stale socket file from a previous run
        return await asyncio.start_unix_server(handler, self.path)


@dataclass(frozen=True)
class TcpTransport(Transport):
    host: str
    port: int

    def __str__(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def connect(self) -> Streams:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def serve(self, handler: StreamHandler) -> Server:
        return await asyncio.start_server(handler, self.host, self.port)


def vsock_socket(factory: Callable[..., socket.socket] = socket.socket) -> socket.socket:
    """A non-blocking AF_VSOCK stream socket (the factory is a seam for unit tests:
    AF_VSOCK is never bound or connected on development machines)."""
    family = getattr(socket, "AF_VSOCK", 40)  # 40 is AF_VSOCK on Linux
    sock = factory(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class VsockTransport(Transport):
    cid: int
    port: int
    socket_factory: Callable[..., socket.socket] = field(default=socket.socket, compare=False, repr=False)

    def __str__(self) -> str:
        return f"vsock://{self.cid}:{self.port}"

    async def connect(self) -> Streams:
        sock = vsock_socket(self.socket_factory)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.cid, self.port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def serve(self, handler: StreamHandler) -> Server:
        sock = vsock_socket(self.socket_factory)
        try:
            sock.bind((self.cid, self.port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return await asyncio.start_server(handler, sock=sock)


_BY_SCHEME: dict[str, Callable[[ChannelAddress], Transport]] = {
    "unix": lambda a: UnixTransport(a.path),
    "tcp": lambda a: TcpTransport(a.host, a.port),
    "vsock": lambda a: VsockTransport(a.cid, a.port),
}


# -- in memory -------------------------------------------------------------------------------------


_READ_BYTES = 64 * 1024  # handed to a pipe end's protocol at once, at most


class _PipeEnd(asyncio.Transport):
    """One end of an in-memory byte pipe on one event loop: what one end writes, the other end's
    protocol receives in order on a later turn of the loop. Flow control works both ways (a reader
    that pauses holds the writer's buffer, which pauses the writer above its high-water mark); a
    closed end gives the other EOF after what was written, and a write to a closed end fails as a
    socket's does (BrokenPipeError)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        super().__init__({"peername": name, "sockname": name})
        self._loop = loop
        self._protocol: Any = None
        self.peer: _PipeEnd = self
        self._inbox: deque[bytes] = deque()  # written by the peer, not yet delivered
        self._inbox_bytes = 0
        self._inbox_eof = False  # the peer writes no more
        self._eof_delivered = False
        self._reading = True
        self._scheduled = False
        self._closing = False
        self._lost = False
        self._eof_written = False
        self._high, self._low = 64 * 1024, 16 * 1024
        self._writing_paused = False

    # -- asyncio.Transport

    def get_protocol(self) -> Any:
        return self._protocol

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        self._reading = True
        self._schedule()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self.peer._inbox_bytes

    def can_write_eof(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data or self._closing:
            return
        peer = self.peer
        if peer._closing:
            self._fail(BrokenPipeError(errno.EPIPE, "the other end of the pipe is closed"))
            return
        peer._inbox.append(bytes(data))
        peer._inbox_bytes += len(data)
        peer._schedule()
        self._maybe_pause()

    def write_eof(self) -> None:
        if self._eof_written or self._closing:
            return
        self._eof_written = True
        self.peer._inbox_eof = True
        self.peer._schedule()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._drop_inbox()
        peer = self.peer
        peer._inbox_eof = True  # the other end reads what was written, then EOF
        peer._schedule()
        self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._drop_inbox()
        self.peer._fail(ConnectionResetError(errno.ECONNRESET, "the other end of the pipe aborted"))
        self._loop.call_soon(self._connection_lost, None)

    # -- internals

    def _drop_inbox(self) -> None:
        """What the peer wrote and this end will never read: a peer waiting to drain is released
        (its next write fails)."""
        self._inbox.clear()
        self._inbox_bytes = 0
        self.peer._maybe_resume()

    def _fail(self, exc: Exception) -> None:
        if self._closing:
            return
        self._closing = True
        self._drop_inbox()
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc)

    def _schedule(self) -> None:
        if self._scheduled or self._closing or not self._reading:
            return
        if self._inbox or (self._inbox_eof and not self._eof_delivered):
            self._scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        protocol = self._protocol
        while self._inbox and self._reading and not self._closing:
            data = self._inbox.popleft()
            if len(data) > _READ_BYTES:  # what a socket read would take; the rest waits its turn
                self._inbox.appendleft(data[_READ_BYTES:])
                data = data[:_READ_BYTES]
            self._inbox_bytes -= len(data)
            protocol.data_received(data)  # may pause reading
        self.peer._maybe_resume()
        if self._inbox_eof and not self._inbox and not self._eof_delivered and self._reading and not self._closing:
            self._eof_delivered = True
            if not protocol.eof_received():
                self.close()

    def _maybe_pause(self) -> None:
        if not self._writing_paused and not self._lost and self.get_write_buffer_size() > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _maybe_resume(self) -> None:
        if self._writing_paused and not self._lost and self.get_write_buffer_size() <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()


def _pipe(name: str) -> tuple[_PipeEnd, _PipeEnd]:
    loop = asyncio.get_running_loop()
    a, b = _PipeEnd(loop, name), _PipeEnd(loop, name)
    a.peer, b.peer = b, a
    return a, b


def _streams(end: _PipeEnd) -> Streams:
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    end.set_protocol(protocol)
    protocol.connection_made(end)
    return reader, asyncio.StreamWriter(end, protocol, reader, asyncio.get_running_loop())


def memory_pipe(name: str = "memory") -> tuple[Streams, Streams]:
    """Two stream pairs connected to each other in memory."""
    a, b = _pipe(name)
    return _streams(a), _streams(b)


class _MemoryServer:
    def __init__(self, handler: StreamHandler) -> None:
        self.handler = handler
        self._closed = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()

    def accept(self, end: _PipeEnd) -> None:
        """Run the handler on a new connection in a task of its own, as asyncio's servers do (an
        exception it raises is reported and closes the connection)."""
        reader, writer = _streams(end)

        async def handle() -> None:
            await self.handler(reader, writer)

        task = asyncio.create_task(handle())
        self._handlers.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._handlers.discard(task)
            if not task.cancelled() and task.exception() is not None:
                task.get_loop().call_exception_handler(
                    {"message": "Unhandled exception in a memory transport handler", "exception": task.exception()}
                )
                writer.close()

        task.add_done_callback(done)

    @property
    def serving(self) -> bool:
        return not self._closed.is_set()

    def close(self) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> _MemoryServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class MemoryTransport(Transport):
    """Streams connected in-process (unit tests): the instance is the address, so serve() and
    connect() on the same instance reach each other. Connections outlive a closed server, as
    asyncio's do."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self._server: _MemoryServer | None = None

    def __str__(self) -> str:
        return f"memory://{self.name}"

    async def connect(self) -> Streams:
        server = self._server
        if server is None or not server.serving:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{self}: nothing is serving")
        near, accepted = _pipe(str(self))
        streams = _streams(near)
        server.accept(accepted)
        return streams

    async def serve(self, handler: StreamHandler) -> Server:
        if self._server is not None and self._server.serving:
            raise OSError(errno.EADDRINUSE, f"{self}: already serving")
        self._server = _MemoryServer(handler)
        return self._server


# -- transports that carry another transport's bytes -----------------------------------------------


_carrying: set[asyncio.Task[None]] = set()  # every LinkTransport's tasks, held until they end


class Direction(Enum):
    OUT = "out"  # from the side using the transport to its peer
    IN = "in"  # from the peer


class LinkTransport(Transport):
    """A transport whose bytes pass through ``carry`` on their way to and from ``inner``.

    connect(): the inner transport's connection, reached through an in-memory pipe whose
    other end ``carry`` links to it, one task per direction. serve(): the same for each
    accepted connection. relay(listen): a proxy between processes, serving on another
    transport and carrying each accepted connection to a new inner connection.
    A direction that ends at EOF passes the EOF on; an error in either direction (or both
    ending) closes both sides. Every write it makes stays below WRITE_CHUNK_BYTES (see
    schemas.frames).
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self._tasks: set[asyncio.Task[None]] = set()

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.inner})"

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
        """Move bytes from ``reader`` to ``writer`` until EOF (override to delay, alter or record them)."""
        while data := await reader.read(WRITE_CHUNK_BYTES):
            writer.write(data)
            await writer.drain()

    async def connect(self) -> Streams:
        far = await self.inner.connect()
        near, mine = memory_pipe(str(self))
        self.splice(mine, far)
        return near

    async def serve(self, handler: StreamHandler) -> Server:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            mine, near = memory_pipe(str(self))
            self.splice(mine, (reader, writer))
            await handler(*near)

        return await self.inner.serve(accepted)

    async def relay(self, listen: Transport) -> Server:
        """Serve on ``listen``; each accepted connection is carried to a new connection of the inner
        transport (OUT: towards the inner transport's peer)."""

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                far = await self.inner.connect()
            except OSError:
                writer.close()
                return
            self.splice((reader, writer), far)

        return await listen.serve(accepted)

    def splice(self, near: Streams, far: Streams) -> None:
        """Carry ``near``'s bytes to ``far`` (OUT) and ``far``'s back (IN)."""
        writers = (near[1], far[1])
        for w in writers:
            w.transport.set_write_buffer_limits(high=WRITE_CHUNK_BYTES, low=WRITE_CHUNK_BYTES // 4)
        running = [2]  # directions still carrying
        for reader, writer, direction in ((near[0], far[1], Direction.OUT), (far[0], near[1], Direction.IN)):
            task = asyncio.create_task(self._pump(reader, writer, direction, writers, running))
            _carrying.add(task)
            self._tasks.add(task)
            task.add_done_callback(self._done)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction,
        writers: tuple[asyncio.StreamWriter, ...], running: list[int],
    ) -> None:  # fmt: skip
        down = True
        try:
            await self.carry(reader, writer, direction)
            if not writer.is_closing() and writer.can_write_eof():
                writer.write_eof()  # this direction is done; the other may still carry
                down = False
        except (ConnectionError, OSError):
            pass  # the link is down
        finally:
            running[0] -= 1
            if down or running[0] == 0:
                for w in writers:
                    w.close()

    def _done(self, task: asyncio.Task[None]) -> None:
        _carrying.discard(task)
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            task.get_loop().call_exception_handler(
                {"message": f"{self}: carrying bytes failed", "exception": task.exception(), "task": task}
            )

    async def aclose(self) -> None:
        """Close every connection this transport carries."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ShapedTransport(LinkTransport):
    """``inner`` behind an emulated link. Bytes this side sends leave after their serialization
    time at the bandwidth cap plus the one-way latency; bytes it receives arrive after the latency
    (the peer does not shape, so its sending is not capped). In order, and bytes keep flowing while
    earlier ones are "on the wire"."""

    def __init__(self, inner: Transport, shaping: LinkShaping) -> None:
        super().__init__(inner)
        self.shaping = shaping

    def __str__(self) -> str:
        return f"{self.inner}?{self.shaping.query()}"

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
        loop = asyncio.get_running_loop()
        latency = self.shaping.latency_s
        bandwidth = self.shaping.bandwidth_bps if direction is Direction.OUT else 0.0
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def release() -> None:
            while (entry := await line.get()) is not None:
                due, data = entry
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        releasing = asyncio.create_task(release())
        wire_free_at = 0.0
        try:
            while not releasing.done() and (data := await reader.read(WRITE_CHUNK_BYTES)):
                start = max(loop.time(), wire_free_at)
                if bandwidth > 0:
                    start += len(data) / bandwidth
                wire_free_at = start
                line.put_nowait((start + latency, data))
            line.put_nowait(None)  # what is on the wire still arrives
            await releasing
        finally:
            releasing.cancel()
