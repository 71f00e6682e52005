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
from urllib.parse import urlsplit

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class TransportUrlError(ValueError):
    """A channel URL that names no usable transport."""


@dataclass(frozen=True, slots=True)
class ChannelAddress:
    scheme: str  # "vsock" | "unix" | "tcp"
    host: str = ""
    port: int = 0
    path: str = ""
    cid: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        if self.scheme == "vsock":
            return f"vsock://{self.cid}:{self.port}"
        return f"tcp://{self.host}:{self.port}"


def parse_channel_url(url: str) -> ChannelAddress:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path.startswith("/"):
            raise TransportUrlError(f"{url!r}: unix URLs take an absolute path, unix:///run/x.sock")
        return ChannelAddress("unix", path=path)
    if parts.scheme in ("tcp", "vsock"):
        try:
            port = parts.port
        except ValueError:
            raise TransportUrlError(f"{url!r}: the port is not a number") from None
        if port is None or not parts.hostname:
            raise TransportUrlError(f"{url!r}: expected {parts.scheme}://HOST:PORT")
        if parts.scheme == "tcp":
            return ChannelAddress("tcp", host=parts.hostname, port=port)
        try:
            cid = int(parts.hostname)
        except ValueError:
            raise TransportUrlError(f"{url!r}: the vsock CID must be a number") from None
        return ChannelAddress("vsock", cid=cid, port=port)
    raise TransportUrlError(f"{url!r}: unknown transport, expected vsock://, unix:// or tcp://")


async def open_channel(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    addr = parse_channel_url(url)
    if addr.scheme == "unix":
        return await asyncio.open_unix_connection(addr.path)
    if addr.scheme == "tcp":
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
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
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((addr.cid, addr.port))
    return await asyncio.start_server(handler, sock=sock)
