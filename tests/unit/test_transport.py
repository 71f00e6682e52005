"""Channel transports: URL parsing, the one function choosing a transport, vsock through its socket
factory, the in-memory transport (and an enclave connection over it), shaped links (delays and
throughput compared as ratios) and the test transports. AF_VSOCK is never bound or connected on
these machines."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from enclave_worker.server import EnclaveServer
from schemas import frames
from schemas.transport import (
    ChannelAddress,
    LinkShaping,
    MemoryTransport,
    ShapedTransport,
    TcpTransport,
    Transport,
    TransportUrlError,
    UnixTransport,
    VsockTransport,
    parse_channel_url,
    transport_for,
)
from signer.channel import Batch, ChannelSettings, EnclaveConnection, Pending
from tests.transports import FaultyTransport, RecordingTransport


@pytest.mark.parametrize(
    ("url", "addr"),
    [
        ("unix:///run/enclave.sock", ChannelAddress("unix", path="/run/enclave.sock")),
        ("tcp://127.0.0.1:5005", ChannelAddress("tcp", host="127.0.0.1", port=5005)),
        ("vsock://16:5000", ChannelAddress("vsock", cid=16, port=5000)),
        ("vsock://4294967295:5000", ChannelAddress("vsock", cid=4294967295, port=5000)),
    ],
)
def test_urls_name_their_transport(url: str, addr: ChannelAddress) -> None:
    assert parse_channel_url(url) == addr
    assert str(addr) == url


@pytest.mark.parametrize(
    "url", ["http://x:1", "unix://relative.sock", "tcp://host", "tcp://h:notaport", "vsock://cid:5000", "vsock://3"]
)
def test_bad_urls_are_refused_with_a_reason(url: str) -> None:
    with pytest.raises(TransportUrlError, match=r"."):
        parse_channel_url(url)


@pytest.mark.parametrize(
    ("url", "latency_s", "bps"),
    [
        ("unix:///x.sock?latency_ms=2", 0.002, 0.0),
        ("tcp://127.0.0.1:1?bandwidth_mbps=80", 0.0, 10e6),
        ("tcp://127.0.0.1:1?latency_ms=0.5&bandwidth_mbps=8", 0.0005, 1e6),
    ],
)
def test_emulated_links_take_shaping_parameters(url: str, latency_s: float, bps: float) -> None:
    shaping = parse_channel_url(url).shaping
    assert (
        shaping.active and shaping.latency_s == pytest.approx(latency_s) and shaping.bandwidth_bps == pytest.approx(bps)
    )


@pytest.mark.parametrize(
    "url",
    [
        "vsock://16:5000?latency_ms=1",
        "unix:///x.sock?latency=1",
        "unix:///x.sock?latency_ms=-1",
        "tcp://h:1?bandwidth_mbps=fast",
    ],
)
def test_bad_shaping_is_refused(url: str) -> None:
    with pytest.raises(TransportUrlError):
        parse_channel_url(url)


class _RecordingSocket:
    def __init__(self, family: int, kind: int) -> None:
        self.family, self.kind = family, kind
        self.blocking: bool | None = None

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag


def test_vsock_sockets_are_af_vsock_stream_and_non_blocking() -> None:
    import socket

    from schemas.transport import vsock_socket

    sock = vsock_socket(_RecordingSocket)  # type: ignore[arg-type]
    assert sock.family == getattr(socket, "AF_VSOCK", 40)  # type: ignore[attr-defined]
    assert sock.kind == socket.SOCK_STREAM and sock.blocking is False  # type: ignore[attr-defined]


# -- one function from URL to transport --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("unix:///run/enclave.sock", UnixTransport("/run/enclave.sock")),
        ("tcp://127.0.0.1:5005", TcpTransport("127.0.0.1", 5005)),
        ("vsock://16:5000", VsockTransport(16, 5000)),
    ],
)
def test_a_url_chooses_its_transport(url: str, transport: Transport) -> None:
    chosen = transport_for(url)
    assert type(chosen) is type(transport) and chosen == transport and str(chosen) == url


@pytest.mark.parametrize(
    ("url", "inner"),
    [
        ("unix:///x.sock?latency_ms=2&bandwidth_mbps=8", UnixTransport("/x.sock")),
        ("tcp://127.0.0.1:1?latency_ms=0.5", TcpTransport("127.0.0.1", 1)),
    ],
)
def test_a_shaped_url_wraps_its_transport(url: str, inner: Transport) -> None:
    chosen = transport_for(url)
    assert isinstance(chosen, ShapedTransport) and chosen.inner == inner
    assert chosen.shaping == parse_channel_url(url).shaping and str(chosen) == url


@pytest.mark.parametrize("url", ["http://x:1", "unix://relative.sock", "vsock://16:5000?latency_ms=1", "tcp://h:1?x=1"])
def test_a_bad_url_chooses_no_transport(url: str) -> None:
    with pytest.raises(TransportUrlError):
        transport_for(url)


# -- vsock, through its socket factory (AF_VSOCK itself is never bound or connected here) --------------


class _VsockStandIn:
    """What the factory hands VsockTransport instead of an AF_VSOCK socket: an AF_UNIX socket that
    binds and connects a (cid, port) address as a path in a test directory."""

    def __init__(self, directory: Path, family: int, kind: int) -> None:
        self.asked = (family, kind)
        self.calls: list[tuple[str, object]] = []
        self._dir = directory
        self._sock = socket.socket(socket.AF_UNIX, kind)

    def _path(self, address: tuple[int, int]) -> str:
        return str(self._dir / f"{address[0]}-{address[1]}.sock")

    def setblocking(self, flag: bool) -> None:
        self.calls.append(("setblocking", flag))
        self._sock.setblocking(flag)

    def bind(self, address: tuple[int, int]) -> None:
        self.calls.append(("bind", address))
        self._sock.bind(self._path(address))

    def connect(self, address: tuple[int, int]) -> None:
        self.calls.append(("connect", address))
        self._sock.connect(self._path(address))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


async def test_vsock_connects_and_serves_through_its_socket_factory(sock_dir: Path) -> None:
    made: list[_VsockStandIn] = []

    def factory(family: int, kind: int) -> _VsockStandIn:
        made.append(_VsockStandIn(sock_dir, family, kind))
        return made[-1]

    transport = VsockTransport(16, 5000, socket_factory=factory)  # type: ignore[arg-type]

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await transport.serve(echo)
    try:
        reader, writer = await transport.connect()
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    vsock = (getattr(socket, "AF_VSOCK", 40), socket.SOCK_STREAM)
    assert [s.asked for s in made] == [vsock, vsock]
    assert made[0].calls[:2] == [("setblocking", False), ("bind", (16, 5000))]
    assert made[1].calls[:2] == [("setblocking", False), ("connect", (16, 5000))]
    # nothing serving: the connection fails and its socket is closed
    with pytest.raises(OSError):
        await transport.connect()
    assert made[-1].fileno() == -1


# -- in memory ----------------------------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_memory_streams_carry_bytes_in_order_then_eof() -> None:
    transport = MemoryTransport("echo")
    async with await transport.serve(_echo):
        reader, writer = await transport.connect()
        sent = b"".join(bytes([i]) * i for i in range(256))
        for i in range(0, len(sent), 1000):
            writer.write(sent[i : i + 1000])
        writer.write_eof()
        assert await reader.read() == sent  # everything, then EOF when the server closes
        assert writer.get_extra_info("peername") == "memory://echo"
        writer.close()
        await writer.wait_closed()


async def test_a_memory_transport_is_its_own_address() -> None:
    transport = MemoryTransport("m")
    with pytest.raises(ConnectionRefusedError):
        await transport.connect()
    server = await transport.serve(_echo)
    with pytest.raises(OSError):
        await transport.serve(_echo)
    reader, writer = await transport.connect()
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await transport.connect()
    writer.write(b"still up")  # a connection outlives its closed server
    assert await reader.readexactly(8) == b"still up"
    writer.close()


async def test_memory_streams_apply_backpressure() -> None:
    transport = MemoryTransport()
    reading = asyncio.Event()
    received = bytearray()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reading.wait()
        while data := await reader.read(65536):
            received.extend(data)
        writer.close()

    await transport.serve(slow)
    _, writer = await transport.connect()
    writer.transport.set_write_buffer_limits(high=64 * 1024)
    payload = bytes(1024 * 1024)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    sending = asyncio.create_task(send())
    for _ in range(20):
        await asyncio.sleep(0)
    # the reader holds at most its buffer: the rest waits on the writer's side, and drain() waits
    assert not sending.done() and writer.transport.get_write_buffer_size() > 64 * 1024
    reading.set()
    await asyncio.wait_for(sending, 10)
    await asyncio.wait_for(_until(lambda: len(received) == len(payload)), 10)
    assert bytes(received) == payload


async def _until(predicate: Any) -> None:
    while not predicate():  # noqa: ASYNC110 - in-memory state, bounded by the caller's timeout
        await asyncio.sleep(0)


async def test_writing_to_a_closed_memory_stream_fails_as_a_socket_does() -> None:
    transport = MemoryTransport()
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    await transport.serve(keep)
    reader, writer = await transport.connect()
    server_writer = await accepted.get()
    writer.close()
    await writer.wait_closed()
    with pytest.raises(ConnectionError):
        server_writer.write(b"anyone there?")
        await server_writer.drain()
    # an aborted connection is reset for the other end
    reader, writer = await transport.connect()
    (await accepted.get()).transport.abort()
    with pytest.raises(ConnectionResetError):
        await reader.read(1)


# -- links: shaping, relays, the test transports --------------------------------------------------------


async def _rtt(transport: Transport, rounds: int = 5) -> float:
    reader, writer = await transport.connect()
    try:
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            writer.write(b"ping")
            await reader.readexactly(4)
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        writer.close()


async def _send_seconds(transport: Transport, n: int) -> float:
    """Time to send n bytes to a server that answers one byte once it has them all."""
    reader, writer = await transport.connect()
    try:
        t0 = time.perf_counter()
        writer.write(bytes(n))
        await reader.readexactly(1)
        return time.perf_counter() - t0
    finally:
        writer.close()


async def test_a_shaped_link_adds_its_latency_each_way() -> None:
    plain = MemoryTransport()
    await plain.serve(_echo)
    base = await _rtt(plain)
    near = await _rtt(ShapedTransport(plain, LinkShaping(latency_s=0.02)))
    far = await _rtt(ShapedTransport(plain, LinkShaping(latency_s=0.04)))
    assert near >= 0.04 and far >= 0.08  # the latency, each way
    assert 1.5 < far / near < 2.5  # twice the latency, twice the round trip
    assert near / base > 10


async def test_a_shaped_link_caps_what_it_sends() -> None:
    plain = MemoryTransport()
    total = 400_000

    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(total)
        writer.write(b"!")
        await writer.drain()

    await plain.serve(count_then_answer)
    slow = await _send_seconds(ShapedTransport(plain, LinkShaping(bandwidth_bps=4e6)), total)
    fast = await _send_seconds(ShapedTransport(plain, LinkShaping(bandwidth_bps=8e6)), total)
    assert slow >= total / 4e6  # 400 kB cannot cross a 4 MB/s link faster
    assert 1.5 < slow / fast < 2.5  # twice the bandwidth, half the time


async def test_a_shaped_link_does_not_cap_what_the_peer_sends() -> None:
    total = 400_000
    plain = MemoryTransport()

    async def push(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(bytes(total))
        await writer.drain()

    async def count_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(total)
        writer.write(b"!")
        await writer.drain()

    shaping = LinkShaping(bandwidth_bps=4e6)
    pushing = MemoryTransport()
    await pushing.serve(push)
    reader, writer = await ShapedTransport(pushing, shaping).connect()
    t0 = time.perf_counter()
    await reader.readexactly(total)
    received = time.perf_counter() - t0
    writer.close()
    await plain.serve(count_then_answer)
    sent = await _send_seconds(ShapedTransport(plain, shaping), total)
    assert received / sent < 0.5  # the peer does not shape: only latency applies on the way in


async def test_shaped_links_keep_bytes_in_order() -> None:
    plain = MemoryTransport()
    await plain.serve(_echo)
    reader, writer = await ShapedTransport(plain, LinkShaping(0.001, 50e6)).connect()
    sent = bytes(range(256)) * 4000
    writer.write(sent)
    writer.write_eof()
    assert await reader.readexactly(len(sent)) == sent
    writer.close()


async def test_a_relay_carries_connections_through_a_recording_transport() -> None:
    inner, front = MemoryTransport("enclave"), MemoryTransport("front")
    await inner.serve(_echo)
    recorder = RecordingTransport(inner)
    relay = await recorder.relay(front)
    reader, writer = await front.connect()
    writer.write(b"to the enclave")
    assert await reader.readexactly(14) == b"to the enclave"
    writer.close()
    await asyncio.wait_for(_until(lambda: not recorder._tasks), 5)  # both directions ended
    assert (bytes(recorder.sent), bytes(recorder.received)) == (b"to the enclave", b"to the enclave")
    assert bytes(recorder.captured) == b"to the enclave" * 2
    relay.close()


async def test_a_faulty_transport_corrupts_then_cuts() -> None:
    inner = MemoryTransport()
    received: list[bytes] = []

    async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.append(data)
        writer.close()

    await inner.serve(collect)
    link = FaultyTransport(inner)
    reader, writer = await link.connect()
    link.corrupt_next = True
    writer.write(b"0123456789")
    await asyncio.wait_for(_until(lambda: received), 5)
    assert received == [b"0123\xcb56789"]  # "4" ^ 0xFF
    link.cut_next = True
    writer.write(b"abcdefgh")
    assert await reader.read() == b""  # the link dropped
    assert received[1:] == [b"abcd"] and (link.corrupted, link.cuts) == (1, 1)
    writer.close()


# -- an enclave connection over the in-memory transport -------------------------------------------------


def _raw(i: int) -> bytes:
    return msgpack.packb({"v": 1, "request_id": f"r{i}", "key_id": "k", "scheme": "ed25519", "payload": b"x"})


async def test_an_enclave_connection_talks_to_an_in_process_enclave() -> None:
    transport = MemoryTransport("e0")
    server = EnclaveServer("memory://e0", "e0", credits=8, handler="noop", transport=transport)
    await server.start()
    lost: list[tuple[list[Pending], list[Pending]]] = []
    settings = ChannelSettings(batch_window_s=0, heartbeat_interval_s=0.01)
    conn = EnclaveConnection("memory://e0", settings, lambda c, sent, unsent: lost.append((sent, unsent)),
                             transport=transport)  # fmt: skip
    await conn.connect()
    assert (conn.enclave_id, conn.credits, conn.connected) == ("e0", 8, True)
    serving = asyncio.create_task(conn.serve())
    try:
        raws = [_raw(i) for i in range(50)]
        batch = Batch(len(raws))
        for i, raw in enumerate(raws):
            conn.enqueue(Pending("k", raw, batch, i))
        results = await asyncio.wait_for(batch, 10)
        assert [r["signature"] for r in results] == [hashlib.sha256(raw).digest() for raw in raws]
        assert conn.stats.frames_out >= 50 / 8 and conn.credits == 8  # never beyond the credits; all returned
        reply = await asyncio.wait_for(conn.key_op("keys.list", {"nonce": b"n" * 16}), 10)
        assert reply["ok"] is False and reply["error"]["code"] == "unsupported"  # the noop enclave has no vault
        rx = conn._last_rx
        await asyncio.wait_for(_until(lambda: conn._last_rx > rx), 5)  # heartbeats answered
    finally:
        await server.close()
    reason = await asyncio.wait_for(serving, 5)
    assert reason == "enclave closed the connection" and lost == [([], [])]


async def test_the_enclave_refuses_frames_by_its_table() -> None:
    transport = MemoryTransport()
    server = EnclaveServer("memory://e", "e", credits=2, handler="noop", transport=transport)
    await server.start()
    try:
        reader, writer = await transport.connect()
        assert await frames.receive_frame(reader) == frames.HelloFrame(frames.PROTOCOL_VERSION, "e", 2)
        # a key operation with bad args is answered, and the connection stays
        await frames.write_frame(writer, frames.encode_frame({"t": frames.KEY_OP, "id": 3, "op": "x", "args": 1}))
        reply = await frames.receive_frame(reader)
        assert type(reply) is frames.KeyOpResultFrame and (reply.id, reply.ok) == (3, False)
        assert reply.error is not None and reply.error["code"] == "invalid_argument"
        await frames.write_frame(writer, frames.PingFrame(4).encode())
        assert await frames.receive_frame(reader) == frames.PongFrame(4, {})
        # a frame the enclave has no handler for closes the connection, with its reason
        await frames.write_frame(writer, frames.ResultsFrame([], 0).encode())
        error = await frames.receive_frame(reader)
        assert type(error) is frames.ErrorFrame and error.code == "unknown_frame"
        assert await reader.read() == b""
        # more requests than credits: refused
        reader, writer = await transport.connect()
        await frames.receive_frame(reader)
        await frames.write_frame(writer, frames.SignFrame([[i, _raw(i)] for i in range(3)]).encode())
        error = await frames.receive_frame(reader)
        assert type(error) is frames.ErrorFrame and error.code == "credits_exceeded"
    finally:
        await server.close()


async def test_the_host_drops_an_enclave_that_sends_what_it_has_no_handler_for() -> None:
    transport = MemoryTransport()

    async def confused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await frames.write_frame(writer, frames.HelloFrame(frames.PROTOCOL_VERSION, "x", 1).encode())
        await frames.write_frame(writer, frames.SignFrame([]).encode())  # host -> enclave only
        await reader.read()

    await transport.serve(confused)
    conn = EnclaveConnection("memory://x", ChannelSettings(), lambda c, sent, unsent: None, transport=transport)
    await conn.connect()
    reason = await asyncio.wait_for(conn.serve(), 5)
    assert "unknown_frame" in reason and conn.lost_cause == "error"
