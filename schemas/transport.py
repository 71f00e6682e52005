"""Channel transports chosen by URL: vsock://CID:PORT, unix:///path, tcp://host:port.

One interface, three implementations: callers get asyncio streams and never
know which transport carries them. AF_VSOCK is only as thick as creating the
socket; asyncio takes the ready socket via ``sock=`` (getaddrinfo knows no vsock).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class TransportUrlError(ValueError):
    """A channel URL that names no usable transport."""


@dataclass(frozen=True, slots=True)
class LinkShaping:
    """Emulated link limits (unix/tcp only): added one-way latency and a bandwidth cap."""

    latency_s: float = 0.0
    bandwidth_bps: float = 0.0  # bytes per second; 0 = unlimited

    @property
    def active(self) -> bool:
        return self.latency_s > 0 or self.bandwidth_bps > 0


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


def vsock_socket(factory: Callable[..., socket.socket] = socket.socket) -> socket.socket:
    """A non-blocking AF_VSOCK stream socket (the factory is a seam for unit tests:
    AF_VSOCK is never bound or connected on development machines)."""
    family = getattr(socket, "AF_VSOCK", 40)  # 40 is AF_VSOCK on Linux
    sock = factory(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


async def open_channel(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    addr = parse_channel_url(url)
    if addr.scheme == "unix":
        return await asyncio.open_unix_connection(addr.path)
    if addr.scheme == "tcp":
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer
    sock = vsock_socket()
    try:
        await asyncio.get_running_loop().sock_connect(sock, (addr.cid, addr.port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def serve_channel(url: str, handler: StreamHandler) -> asyncio.Server:
    addr = parse_channel_url(url)
    if addr.scheme == "unix":
        if os.path.exists(addr.path):  # noqa: ASYNC240 - once, before serving
            os.unlink(addr.path)  # a stale socket file from a previous run
        return await asyncio.start_unix_server(handler, addr.path)
    if addr.scheme == "tcp":
        return await asyncio.start_server(handler, addr.host, addr.port)
    sock = vsock_socket()
    sock.bind((addr.cid, addr.port))
    sock.listen(128)
    return await asyncio.start_server(handler, sock=sock)
