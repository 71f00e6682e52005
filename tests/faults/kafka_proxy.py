"""A Kafka-protocol-aware TCP proxy for fault tests, run on the test's event loop.

Kafka requests and responses are frames: a 4-byte big-endian length, then the frame. A request
header starts with api_key (int16), api_version (int16), correlation_id (int32) and client_id
(int16-length string); a response header starts with the correlation_id. Responses come back on
a connection in the order of its requests, so the proxy pairs each response with its request
through a per-connection table keyed by correlation id.

Point a broker's advertised listener at the proxy (``advertised.listeners=PLAINTEXT://<proxy>``;
see `proxied_properties`) and every client connection - bootstrap or not - goes through it.
The proxy then can, for requests whose client_id matches a filter (the signer host's producer
uses ``signer-host``):

- **account** every Produce it forwards: the record keys of each (topic, partition) of a request
  (decoded from the v2 record batches) become *acknowledged* once the broker's response for that
  partition (error 0) is passed to the client; `acked` maps (topic, key) to the sequence number
  of its first acknowledgement, `ack_seq` is the latest sequence number handed out;
- **hold** Produce responses (`hold_produce` / `release`): a held response and every later
  response on its connection wait, in order, until released (a Kafka client requires responses
  in request order);
- **fail** Produce acknowledgements (`fail_produce`): the request is forwarded (the broker writes
  it) but the client is answered, for every partition of it, with an error code instead;
- **cut** connections instead of acknowledging (`cut_produce`): the request is forwarded (the
  broker writes it), then, when its response comes back, the connection is closed both ways
  and the response is lost;
- **stall** the connections of chosen processes (`stall` / `resume`): nothing is read from or
  written to them, in either direction, until resumed; the sockets stay open. A connection's
  process is found from /proc (the socket inode of its peer port);
- **black-hole** chosen processes (`black_hole` / `end_black_hole`): their connections are cut,
  and every new connection they open is accepted and read (requests, ApiVersions included, are
  counted) but never forwarded and never answered - a broker that takes connections and then says
  nothing; when the hole ends its connections are closed (as a broker coming back would) and new
  connections are forwarded again.

Everything else is forwarded unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRODUCE = 0
# Produce responses this proxy can decode and forge: v3-v8, the non-flexible versions with a
# transactional id (Kafka 4.0 accepts v3-v12; aiokafka 0.14 asks for at most v8)
PRODUCE_VERSIONS = range(3, 9)
NO_ERROR, DUPLICATE_SEQUENCE_NUMBER = 0, 46
CORRUPT_MESSAGE = 2  # not retriable for aiokafka: the batch fails and send() raises


def proxied_properties(proxy_port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """server.properties lines for a one-node LocalKafkaCluster whose clients all go through the
    proxy: LocalKafkaCluster appends `properties` after its own lines, and the last value of a key
    wins (java.util.Properties), so this replaces the node's own advertised.listeners. The
    controller listener needs no advertised address: the quorum is static
    (controller.quorum.voters)."""
    return {"advertised.listeners": f"PLAINTEXT://{host}:{proxy_port}"}


# -- Kafka protocol pieces -------------------------------------------------------------------------


class _Buf:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def take(self, fmt: str) -> tuple[int, ...]:
        vals = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> str | None:
        (n,) = self.take(">h")
        return None if n < 0 else self.raw(n).decode()

    def varint(self) -> int:
        shift = value = 0
        while True:
            byte = self.raw(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return (value >> 1) ^ -(value & 1)  # zigzag
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")


@dataclass(frozen=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None


def request_header(frame: bytes) -> RequestHeader:
    buf = _Buf(frame)
    api_key, api_version, correlation_id = buf.take(">hhi")
    return RequestHeader(api_key, api_version, correlation_id, buf.string())


def batch_keys(records: bytes) -> list[bytes | None]:
    """The keys of the records in a sequence of v2 record batches (uncompressed only)."""
    keys: list[bytes | None] = []
    buf = _Buf(records)
    while buf.pos + 12 <= len(records):
        _base_offset, length = buf.take(">qi")
        end = buf.pos + length
        _leader_epoch, magic = buf.take(">ib")
        if magic != 2:
            raise ValueError(f"record batch magic {magic}")
        _crc, attributes = buf.take(">Ih")
        if attributes & 0x07:
            raise ValueError("compressed record batch: keys not decoded")
        buf.take(">iqqqhi")  # last offset delta, timestamps, producer id/epoch, base sequence
        (count,) = buf.take(">i")
        control = bool(attributes & 0x20)
        for _ in range(count):
            buf.varint()  # record length
            buf.take(">b")  # attributes
            buf.varint()  # timestamp delta
            buf.varint()  # offset delta
            klen = buf.varint()
            key = None if klen < 0 else buf.raw(klen)
            vlen = buf.varint()
            if vlen > 0:
                buf.raw(vlen)
            for _ in range(buf.varint()):  # headers
                buf.raw(buf.varint())
                hv = buf.varint()
                if hv > 0:
                    buf.raw(hv)
            if not control:
                keys.append(key)
        buf.pos = end
    return keys


def produce_request_keys(frame: bytes) -> dict[tuple[str, int], list[bytes | None]]:
    """{(topic, partition): record keys} of a Produce request frame (v3-v8)."""
    buf = _Buf(frame)
    _api_key, version, _corr = buf.take(">hhi")
    if version not in PRODUCE_VERSIONS:
        raise ValueError(f"Produce v{version} not decoded")
    buf.string()  # client id
    buf.string()  # transactional id
    buf.take(">hi")  # acks, timeout
    out: dict[tuple[str, int], list[bytes | None]] = {}
    for _ in range(buf.take(">i")[0]):
        topic = buf.string() or ""
        for _ in range(buf.take(">i")[0]):
            (partition, size) = buf.take(">ii")
            out[(topic, partition)] = batch_keys(buf.raw(size)) if size > 0 else []
    return out


def produce_response_errors(frame: bytes, version: int) -> dict[tuple[str, int], int]:
    """{(topic, partition): error code} of a Produce response frame (v3-v8, header v0)."""
    if version not in PRODUCE_VERSIONS:
        raise ValueError(f"Produce v{version} not decoded")
    buf = _Buf(frame)
    buf.take(">i")  # correlation id
    out: dict[tuple[str, int], int] = {}
    for _ in range(buf.take(">i")[0]):
        topic = buf.string() or ""
        for _ in range(buf.take(">i")[0]):
            partition, error = buf.take(">ih")
            buf.take(">qq" if version < 5 else ">qqq")  # base offset, log append time[, log start offset]
            if version >= 8:
                for _ in range(buf.take(">i")[0]):  # record errors
                    buf.take(">i")
                    buf.string()
                buf.string()  # error message
            out[(topic, partition)] = error
    return out


def produce_error_response(correlation_id: int, version: int, partitions: list[tuple[str, int]], error: int) -> bytes:
    """A Produce response frame (v3-v8, header v0) answering every partition with `error`."""
    if version not in PRODUCE_VERSIONS:
        raise ValueError(f"Produce v{version} not forged")
    by_topic: dict[str, list[int]] = {}
    for topic, partition in partitions:
        by_topic.setdefault(topic, []).append(partition)
    out = bytearray(struct.pack(">ii", correlation_id, len(by_topic)))
    for topic, parts in by_topic.items():
        raw = topic.encode()
        out += struct.pack(">h", len(raw)) + raw + struct.pack(">i", len(parts))
        for p in parts:
            out += struct.pack(">ihqq", p, error, -1, -1)  # partition, error, base offset, log append time
            if version >= 5:
                out += struct.pack(">q", -1)  # log start offset
            if version >= 8:
                out += struct.pack(">ih", 0, -1)  # no record errors, null error message
    out += struct.pack(">i", 0)  # throttle time
    return bytes(out)


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    try:
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        return await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def socket_owner(peer_port: int, local_port: int, pids: set[int]) -> int | None:
    """Which of `pids` owns the loopback TCP socket bound to peer_port and connected to local_port."""
    want_local, want_remote = f":{peer_port:04X}", f":{local_port:04X}"
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[1].endswith(want_local) and cols[2].endswith(want_remote):
                    inode = cols[9]
                    break
        if inode:
            break
    if not inode:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


async def committed_offsets(
    host: str, port: int, group: str, topic: str, partitions: int, timeout: float = 5.0
) -> dict[int, int]:
    """A group's committed offsets ({partition: offset}, -1 where none) read straight from one
    broker (its coordinator) with an OffsetFetch v1 request: no client library, no proxy."""
    client, g, t = b"fault-offsets", group.encode(), topic.encode()
    body = struct.pack(">hhih", 9, 1, 17, len(client)) + client
    body += struct.pack(">h", len(g)) + g + struct.pack(">ih", 1, len(t)) + t
    body += struct.pack(f">i{partitions}i", partitions, *range(partitions))
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack(">i", len(body)) + body)
            frame = await _read_frame(reader)
        finally:
            writer.close()
    if frame is None:
        raise ConnectionError("no OffsetFetch response")
    buf = _Buf(frame)
    if buf.take(">i")[0] != 17:
        raise ValueError("correlation id mismatch")
    out: dict[int, int] = {}
    for _ in range(buf.take(">i")[0]):
        buf.string()
        for _ in range(buf.take(">i")[0]):
            partition, offset = buf.take(">iq")
            buf.string()  # metadata
            (error,) = buf.take(">h")
            if error:
                raise RuntimeError(f"OffsetFetch error {error} on partition {partition}")
            out[partition] = offset
    return out


# -- the proxy -------------------------------------------------------------------------------------


@dataclass
class _Pending:
    header: RequestHeader
    keys: dict[tuple[str, int], list[bytes | None]] | None = None  # Produce requests we account


@dataclass
class _Conn:
    cid: int
    peer_port: int
    client_w: asyncio.StreamWriter
    upstream_w: asyncio.StreamWriter | None = None
    pending: dict[int, _Pending] = field(default_factory=dict)
    held: list[tuple[bytes, _Pending]] = field(default_factory=list)  # responses waiting, in order
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    owner: int | None = None
    client_ids: set[str] = field(default_factory=set)
    holed: bool = False  # in the black hole: read, never forwarded nor answered


@dataclass
class _Fail:
    client_id: str
    error: int
    count: int
    after_acked: int  # fail only once this many keys are acknowledged
    failed: list[dict[tuple[str, int], list[bytes | None]]] = field(default_factory=list)


class KafkaProxy:
    """See the module docstring. `start()` binds a port; set `upstream` (HOST, PORT) before clients
    connect (they wait for it)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._upstream: tuple[str, int] | None = None
        self._upstream_known = asyncio.Event()
        self._ids = itertools.count()
        self.conns: dict[int, _Conn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # accounting
        self.account_client = "signer-host"
        self.acked: dict[tuple[str, bytes], int] = {}  # (topic, key) -> sequence number of its first ack
        self.ack_seq = 0
        self.produced: Counter[tuple[str, bytes]] = Counter()  # (topic, key) -> produce requests carrying it
        self.requests: Counter[int] = Counter()  # api_key -> requests forwarded
        self.errors: list[str] = []  # frames the proxy could not decode (a test should assert none)
        # faults
        self._hold: str | None = None  # client_id whose Produce responses are held
        self.held_total = 0  # Produce responses held so far
        self._fail: _Fail | None = None
        self._cut: tuple[str, int] | None = None  # (client_id, connections left to cut)
        self.cuts = 0
        self.cut_keys: set[tuple[str, bytes]] = set()  # keys of the Produce requests whose answer was lost
        self._stalled_pids: set[int] = set()
        self.stalled_conns: set[int] = set()  # connections stalled at least once
        self._holed_pids: set[int] = set()
        self.hole_cut = 0  # connections cut when a black hole began
        self.holed_conns: set[int] = set()  # connections accepted into a black hole
        self.holed_requests: Counter[int] = Counter()  # api_key -> requests swallowed by a black hole

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def upstream(self) -> tuple[str, int] | None:
        return self._upstream

    @upstream.setter
    def upstream(self, value: tuple[str, int]) -> None:
        self._upstream = value
        self._upstream_known.set()

    async def start(self) -> KafkaProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns.values()):
            conn.flowing.set()
            self._close(conn)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    # -- what tests call -------------------------------------------------------------------------

    def hold_produce(self, client_id: str = "signer-host") -> None:
        """From now on, hold the Produce responses of this client (and what follows them)."""
        self._hold = client_id

    def held(self) -> int:
        """Responses currently held."""
        return sum(len(c.held) for c in self.conns.values())

    def release(self) -> None:
        """Stop holding; pass every held response on, in order."""
        self._hold = None
        for conn in list(self.conns.values()):
            held, conn.held = conn.held, []
            for frame, pending in held:
                self._deliver(conn, frame, pending)

    def fail_produce(self, client_id: str = "signer-host", *, error: int = CORRUPT_MESSAGE, count: int = 1,
                     after_acked: int = 0) -> _Fail:  # fmt: skip
        """Answer the next `count` Produce requests of this client (once `after_acked` keys are
        acknowledged) with `error` for each partition; the requests still reach the broker."""
        self._fail = _Fail(client_id, error, count, after_acked)
        return self._fail

    def cut_produce(self, client_id: str = "signer-host", count: int = 1) -> None:
        """Lose the answers to the next `count` Produce requests of this client (forwarded to the
        broker, which writes them) by closing their connection when each answer arrives."""
        self._cut = (client_id, count)

    def stall(self, pids: set[int]) -> int:
        """Stop forwarding, both ways, on every connection of these processes (and on new ones);
        the number of connections stalled now."""
        self._stalled_pids = set(pids)
        n = 0
        for conn in self.conns.values():
            if self._owner(conn) in pids:
                conn.flowing.clear()
                self.stalled_conns.add(conn.cid)
                n += 1
        return n

    def resume(self) -> None:
        self._stalled_pids = set()
        for conn in self.conns.values():
            conn.flowing.set()

    def black_hole(self, pids: set[int]) -> int:
        """Cut every connection of these processes; from now on, accept and read their new connections
        but neither forward nor answer anything on them. The number of connections cut."""
        self._holed_pids = set(pids)
        cut = [conn for conn in self.conns.values() if not conn.holed and self._owner(conn) in pids]
        for conn in cut:
            conn.flowing.set()
            self._close(conn)
        self.hole_cut += len(cut)
        return len(cut)

    def end_black_hole(self) -> int:
        """Close the connections in the black hole; new ones are forwarded again. How many were closed."""
        self._holed_pids = set()
        holed = [conn for conn in self.conns.values() if conn.holed]
        for conn in holed:
            self._close(conn)
        return len(holed)

    # -- plumbing --------------------------------------------------------------------------------

    def _owner(self, conn: _Conn) -> int | None:
        if conn.owner is None and (self._stalled_pids or self._holed_pids):
            conn.owner = socket_owner(conn.peer_port, self.port, self._stalled_pids | self._holed_pids)
        return conn.owner

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Conn(next(self._ids), peer[1], writer)
        conn.flowing.set()
        self.conns[conn.cid] = conn
        if self._stalled_pids and self._owner(conn) in self._stalled_pids:
            conn.flowing.clear()
            self.stalled_conns.add(conn.cid)
        if self._holed_pids and self._owner(conn) in self._holed_pids:
            conn.holed = True
            self.holed_conns.add(conn.cid)
            await self._swallow(conn, reader)
            return
        try:
            await self._upstream_known.wait()
            assert self._upstream is not None
            up_r, up_w = await asyncio.open_connection(*self._upstream)
        except (OSError, asyncio.CancelledError):
            self._close(conn)
            return
        conn.upstream_w = up_w
        self._spawn(self._responses(conn, up_r))
        await self._requests(conn, reader)

    async def _swallow(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        """A connection in the black hole: read and count its requests, forward and answer none."""
        try:
            while (frame := await _read_frame(reader)) is not None:
                with contextlib.suppress(ValueError, struct.error):
                    self.holed_requests[request_header(frame).api_key] += 1
        finally:
            self._close(conn)

    async def _requests(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        assert conn.upstream_w is not None
        try:
            while (frame := await _read_frame(reader)) is not None:
                await conn.flowing.wait()
                header = request_header(frame)
                pending = _Pending(header)
                if header.client_id:
                    conn.client_ids.add(header.client_id)
                if header.api_key == PRODUCE and header.client_id == self.account_client:
                    try:
                        pending.keys = produce_request_keys(frame)
                        for (topic, _p), keys in pending.keys.items():
                            self.produced.update((topic, k) for k in keys if k is not None)
                    except (ValueError, struct.error) as exc:
                        self.errors.append(f"produce request v{header.api_version}: {exc}")
                conn.pending[header.correlation_id] = pending
                self.requests[header.api_key] += 1
                conn.upstream_w.write(struct.pack(">i", len(frame)) + frame)
                await conn.upstream_w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._close(conn)

    async def _responses(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        try:
            while (frame := await _read_frame(reader)) is not None:
                await conn.flowing.wait()
                (corr,) = struct.unpack_from(">i", frame)
                pending = conn.pending.pop(corr, None)
                if pending is None:
                    self.errors.append(f"response to unknown correlation id {corr}")
                    pending = _Pending(RequestHeader(-1, -1, corr, None))
                frame = self._maybe_fail(frame, pending)
                if self._maybe_cut(pending):
                    break
                is_held_produce = pending.header.api_key == PRODUCE and pending.header.client_id == self._hold
                if conn.held or (self._hold is not None and is_held_produce):
                    if is_held_produce:
                        self.held_total += 1
                    conn.held.append((frame, pending))
                    continue
                self._deliver(conn, frame, pending)
                await conn.client_w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._close(conn)

    def _maybe_fail(self, frame: bytes, pending: _Pending) -> bytes:
        fail = self._fail
        h = pending.header
        if (fail is None or fail.count <= 0 or h.api_key != PRODUCE or h.client_id != fail.client_id
                or len(self.acked) < fail.after_acked or not pending.keys):  # fmt: skip
            return frame
        fail.count -= 1
        fail.failed.append(pending.keys)
        return produce_error_response(h.correlation_id, h.api_version, list(pending.keys), fail.error)

    def _maybe_cut(self, pending: _Pending) -> bool:
        h = pending.header
        if self._cut is None or h.api_key != PRODUCE or h.client_id != self._cut[0] or not pending.keys:
            return False
        client, left = self._cut
        self._cut = (client, left - 1) if left > 1 else None
        self.cuts += 1
        for (topic, _p), keys in pending.keys.items():
            self.cut_keys.update((topic, k) for k in keys if k is not None)
        return True

    def _deliver(self, conn: _Conn, frame: bytes, pending: _Pending) -> None:
        if conn.client_w.is_closing():
            return
        conn.client_w.write(struct.pack(">i", len(frame)) + frame)
        if pending.keys is None:
            return
        try:
            errors = produce_response_errors(frame, pending.header.api_version)
        except (ValueError, struct.error) as exc:
            self.errors.append(f"produce response v{pending.header.api_version}: {exc}")
            return
        for (topic, partition), keys in pending.keys.items():
            if errors.get((topic, partition)) in (NO_ERROR, DUPLICATE_SEQUENCE_NUMBER):
                for key in keys:
                    if key is not None and (topic, key) not in self.acked:
                        self.ack_seq += 1
                        self.acked[(topic, key)] = self.ack_seq

    def _close(self, conn: _Conn) -> None:
        self.conns.pop(conn.cid, None)
        for w in (conn.client_w, conn.upstream_w):
            if w is not None and not w.is_closing():
                w.close()
