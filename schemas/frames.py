"""Host <-> enclave frames: length-prefixed msgpack maps, each carrying a batch.

Layout: a 4-byte big-endian body length, then a msgpack map with ``t`` (frame
type). Frames carry *batches* (``items``) because per-request framing is what
makes small-message vsock slow (~140-180k msgs/s per stream at 64 B versus
~10 Gbit/s at 16-64 KiB writes).

One class per frame type, each with a strict ``from_wire`` (exact types, bounded
sizes, a FrameError with a catalogue code otherwise) and ``to_wire``:

- ``HelloFrame``  enclave -> host, first frame: ``proto``, ``enclave_id``, ``credits``
- ``SignFrame``   host -> enclave: ``items`` = [[corr_id, SignRequest bytes], ...]
  (the request exactly as the producer encoded it; the enclave decodes it again)
- ``ResultsFrame`` enclave -> host: ``items`` = [[corr_id, SignResult map], ...],
  ``credits`` = credits returned with this batch
- ``KeyOpFrame`` / ``KeyOpResultFrame``: key management, correlated by ``id``
- ``PingFrame`` / ``PongFrame``: heartbeats, ``id`` echoed (a pong may carry the enclave's ``stats``)
- ``ErrorFrame``: either way, a reason before closing: ``code`` (a catalogue code on the frame
  surface, schemas.refusals), ``message``

``decode_frame`` turns a body into one of them; each side keeps a table from frame
class to handler and refuses any other frame (``unexpected``). Sign and results
items stay plain ``[id, value]`` lists, checked in one pass: no object per request.
Keys a frame type does not define are ignored.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import msgpack

from .refusals import Code, Refused
from .validate import ContainerBudget, OverBudget

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
# what an enclave accepts from its host: a frame of at most 2 MiB holding at most 50,000 maps and
# lists (a sign frame carries requests as bytes; a keyrings.load frame ~8 per key), so no frame
# can make the enclave build more than a few tens of MiB of objects
HOST_FRAME_BYTES = 2 * 1024 * 1024
HOST_FRAME_CONTAINERS = 50_000
MAX_CONTAINER_LEN = 100_000
MAX_ITEMS = MAX_CONTAINER_LEN  # requests or results in one frame
# key operations one connection may have in flight: an enclave drops a connection that sends more,
# and a host waits for a free one before it sends another
MAX_KEY_OPS_IN_FLIGHT = 8
MAX_OP_CHARS = 64  # a key operation's name
MAX_ENCLAVE_ID_CHARS = 128
MAX_CODE_CHARS = 64  # an error frame's code
MAX_MESSAGE_CHARS = 1024  # an error frame's message
# vsock writes of 32 KiB or more have hit a kernel bug: hand the socket smaller pieces
WRITE_CHUNK_BYTES = 16 * 1024

HELLO = "hello"
SIGN = "sign"
RESULTS = "results"
KEY_OP = "key_op"
KEY_OP_RESULT = "key_op_result"
PING = "ping"
PONG = "pong"
ERROR = "error"

_LEN = struct.Struct(">I")
HEADER_BYTES = _LEN.size


class FrameError(Refused):
    """A frame that cannot be accepted; the connection carrying it is closed (a KeyOpRejected,
    below, is answered instead)."""


class KeyOpRejected(FrameError):
    """A ``key_op`` frame with a valid ``id`` whose ``op`` or ``args`` cannot be accepted. Every key
    operation gets a typed reply: the enclave answers it with a ``key_op_result`` refusal and keeps
    the connection (any other receiver drops it, as for every FrameError)."""

    def __init__(self, code: Code, message: str, op_id: int) -> None:
        super().__init__(code, message)
        self.op_id = op_id


# -- strict field readers ------------------------------------------------------------------------


def _corrupt(frame: str, what: str) -> FrameError:
    return FrameError(Code.CORRUPT_FRAME, f"{frame} frame: {what}")


def _int(body: dict[str, Any], frame: str, name: str) -> int:
    value = body.get(name)
    if type(value) is not int:  # exact: a bool is not an int here
        raise _corrupt(frame, f"{name} must be an int")
    return value


def _count(body: dict[str, Any], frame: str, name: str) -> int:
    value = body.get(name)
    if type(value) is not int or value < 0:
        raise _corrupt(frame, f"{name} must be an int >= 0")
    return value


def _str(body: dict[str, Any], frame: str, name: str, max_chars: int) -> str:
    value = body.get(name)
    if type(value) is not str or len(value) > max_chars:
        raise _corrupt(frame, f"{name} must be a string of at most {max_chars} characters")
    return value


def _map(body: dict[str, Any], frame: str, name: str) -> dict[str, Any]:
    value = body.get(name)
    if type(value) is not dict:
        raise _corrupt(frame, f"{name} must be a map")
    return value


def _items(items: Any, frame: str, kind: type, shape: str) -> list[list[Any]]:
    """``items`` as [[int, kind], ...], checked in one pass without building anything (the sign and
    results path: thousands of frames a second)."""
    if type(items) is not list or len(items) > MAX_ITEMS:
        raise _corrupt(frame, f"items must be a list of at most {MAX_ITEMS}")
    try:
        for item in items:
            corr_id, value = item  # ValueError/TypeError unless a 2-element sequence
            if type(item) is not list or type(corr_id) is not int or type(value) is not kind:
                raise ValueError
    except (TypeError, ValueError):
        raise _corrupt(frame, f"items must be {shape}") from None
    return items


# -- the frames ----------------------------------------------------------------------------------


class Frame:
    """One frame type: ``TYPE`` (its ``t``), ``from_wire`` (strict) and ``to_wire``."""

    __slots__ = ()
    TYPE: ClassVar[str]

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Self:
        raise NotImplementedError

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
        return encode_frame(self.to_wire(), max_bytes)


@dataclass(slots=True)
class HelloFrame(Frame):
    """enclave -> host, the first frame: protocol version, the worker's id, the credits it grants."""

    TYPE: ClassVar[str] = HELLO
    proto: int
    enclave_id: str
    credits: int

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Self:
        return cls(_int(body, HELLO, "proto"), _str(body, HELLO, "enclave_id", MAX_ENCLAVE_ID_CHARS),
                   _count(body, HELLO, "credits"))  # fmt: skip

    def to_wire(self) -> dict[str, Any]:
        return {"t": HELLO, "proto": self.proto, "enclave_id": self.enclave_id, "credits": self.credits}


@dataclass(slots=True)
class SignFrame(Frame):
    """host -> enclave: [[corr_id, SignRequest bytes], ...]."""

    TYPE: ClassVar[str] = SIGN
    items: list[list[Any]]

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Self:
        return cls(_items(body.get("items"), SIGN, bytes, "[[int, bytes], ...]"))

    def to_wire(self) -> dict[str, Any]:
        return {"t": SIGN, "items": self.items}


@dataclass(slots=True)
class ResultsFrame(Frame):
    """enclave -> host: [[corr_id, SignResult map], ...] and the credits returned with them."""

    TYPE: ClassVar[str] = RESULTS
    items: list[list[Any]]
    credits: int

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Self:
        credits = body.get("credits")
        if type(credits) is not int or credits < 0:
            raise _corrupt(RESULTS, "credits must be an int >= 0")
        return cls(_items(body.get("items"), RESULTS, dict, "[[int, map], ...]"), credits)

    def to_wire(self) -> dict[str, Any]:
        return {"t": RESULTS, "items": self.items, "credits": self.credits}


@dataclass(slots=True)
class KeyOpFrame(Frame):
    """host -> enclave: a key operation; ``args`` are checked by the operation's handler."""

    TYPE: ClassVar[str] = KEY_OP
    id: int
    op: str
    args: dict[str, Any]

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Self:
        op_id = _int(body, KEY_OP, "id")
        op, args = body.get("op"), body.get("args")
        if type(op) is not str or not 0 < len(op) <= MAX_OP_CHARS:
            raise KeyOpRejected(Code.UNKNOWN_OP, f"unknown op {str(op)[:40]!r}", op_id)
        if type(args) is not dict:
            raise KeyOpRejected(Code.INVALID_ARGUMENT, "args must be a map", op_id)
        return cls(op_id, op, args)

    def to_wire(self) -> dict[str, Any]:
        return {"t": KEY_OP, "id": self.id, "op": self.op, "args": self.args}


@dataclass(slots=True)
class KeyOpResultFrame(Frame):
    """enclave -> host: a key operation's ``result`` (ok) or refusal ``error`` map (not ok)."""

    TYPE: ClassVar[str] = KEY_OP_RESULT
    id: int
    ok: bool
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @classmethod
    def success(cls, op_id: int, result: dict[str, Any]) -> KeyOpResultFrame:
        return cls(op_id, True, result=result)

    @classmethod
    def refusal(cls, op_id: int, refused: Refused) -> KeyOpResultFrame:
        return cls(op_id, False, error=refused.to_wire())

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Self:
        op_id, ok = _int(body, KEY_OP_RESULT, "id"), body.get("ok")
        if type(ok) is not bool:
            raise _corrupt(KEY_OP_RESULT, "ok must be a bool")
        if ok:
            return cls(op_id, True, result=_map(body, KEY_OP_RESULT, "result"))
        return cls(op_id, False, error=_map(body, KEY_OP_RESULT, "error"))

    def to_wire(self) -> dict[str, Any]:
        if self.ok:
            return {"t": KEY_OP_RESULT, "id": self.id, "ok": True, "result": self.result}
        return {"t": KEY_OP_RESULT, "id": self.id, "ok": False, "error": self.error}


@dataclass(slots=True)
class PingFrame(Frame):
    """host -> enclave: a heartbeat."""

    TYPE: ClassVar[str] = PING
    id: int

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Self:
        return cls(_int(body, PING, "id"))

    def to_wire(self) -> dict[str, Any]:
        return {"t": PING, "id": self.id}


@dataclass(slots=True)
class PongFrame(Frame):
    """enclave -> host: the ping's ``id``, and the enclave's counters (``stats``) when it has them."""

    TYPE: ClassVar[str] = PONG
    id: int
    stats: dict[str, Any] | None = None

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Self:
        stats = _map(body, PONG, "stats") if "stats" in body else None
        return cls(_int(body, PONG, "id"), stats)

    def to_wire(self) -> dict[str, Any]:
        if self.stats is None:
            return {"t": PONG, "id": self.id}
        return {"t": PONG, "id": self.id, "stats": self.stats}


@dataclass(slots=True)
class ErrorFrame(Frame):
    """Either way, before closing: why the sender refuses the connection."""

    TYPE: ClassVar[str] = ERROR
    code: str  # a catalogue code's wire value, as the peer sent it
    message: str

    @classmethod
    def of(cls, refused: Refused) -> ErrorFrame:
        return cls(refused.code.value, refused.message[:200])

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Self:
        return cls(_str(body, ERROR, "code", MAX_CODE_CHARS), _str(body, ERROR, "message", MAX_MESSAGE_CHARS))

    def to_wire(self) -> dict[str, Any]:
        return {"t": ERROR, "code": self.code, "message": self.message}


FRAME_TYPES: dict[str, type[Frame]] = {
    cls.TYPE: cls
    for cls in (HelloFrame, SignFrame, ResultsFrame, KeyOpFrame, KeyOpResultFrame, PingFrame, PongFrame, ErrorFrame)
}


def unexpected(frame: Frame) -> FrameError:
    """The refusal of a well-formed frame the receiver has no handler for."""
    return FrameError(Code.UNKNOWN_FRAME, f"unexpected {frame.TYPE} frame")


# -- bytes <-> bodies <-> frames -------------------------------------------------------------------


def encode_frame(body: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > max_bytes:
        raise FrameError(Code.FRAME_TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    return _LEN.pack(len(data)) + data


def decode_body(data: bytes, max_containers: int | None = None) -> dict[str, Any]:
    """A body as a map with a string ``t``, not checked further (see decode_frame)."""
    try:
        if max_containers is None:
            body = msgpack.unpackb(data, raw=False, strict_map_key=False)
        else:
            budget = ContainerBudget(max_containers)
            body = msgpack.unpackb(data, raw=False, strict_map_key=False, object_hook=budget, list_hook=budget,
                                   max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN)  # fmt: skip
    except OverBudget:
        raise FrameError(Code.FRAME_TOO_COMPLEX, f"more than {max_containers} maps and lists in one frame") from None
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError(Code.CORRUPT_FRAME, f"undecodable body ({type(exc).__name__})") from None
    if type(body) is not dict or type(body.get("t")) is not str:
        raise FrameError(Code.CORRUPT_FRAME, "frame body is not a map with a type")
    return body


def decode_frame(data: bytes, max_containers: int | None = None) -> Frame:
    """A body as its typed frame; FrameError (with its catalogue code) if it is not one."""
    body = decode_body(data, max_containers)
    cls = FRAME_TYPES.get(body["t"])
    if cls is None:
        raise FrameError(Code.UNKNOWN_FRAME, f"unknown frame type {body['t'][:32]!r}")
    return cls.from_wire(body)


async def read_body(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame's body bytes; FrameError if it announces more than max_bytes, IncompleteReadError on EOF."""
    head = await reader.readexactly(HEADER_BYTES)
    (size,) = _LEN.unpack(head)
    if size > max_bytes:
        raise FrameError(Code.FRAME_TOO_LARGE, f"announced {size} bytes > {max_bytes}")
    return await reader.readexactly(size)


async def receive_frame(
    reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES, max_containers: int | None = None
) -> Frame:
    """Read one typed frame; FrameError on a bad frame, IncompleteReadError on EOF."""
    return decode_frame(await read_body(reader, max_bytes), max_containers)


async def read_frame(
    reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES, max_containers: int | None = None
) -> dict[str, Any]:
    """Read one frame as its body map (for tools and tests that speak raw frames)."""
    return decode_body(await read_body(reader, max_bytes), max_containers)


def limit_write_buffer(writer: asyncio.StreamWriter) -> None:
    """Keep the transport's buffer below one chunk so no single send() reaches 32 KiB."""
    writer.transport.set_write_buffer_limits(high=WRITE_CHUNK_BYTES, low=WRITE_CHUNK_BYTES // 4)


async def write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write an encoded frame in pieces below WRITE_CHUNK_BYTES, draining between pieces.

    With limit_write_buffer() applied, the transport never holds more than
    about 1.25 chunks, so every send() it makes stays below 32 KiB.
    """
    if len(data) <= WRITE_CHUNK_BYTES:
        writer.write(data)
        await writer.drain()
        return
    view = memoryview(data)
    for i in range(0, len(data), WRITE_CHUNK_BYTES):
        writer.write(view[i : i + WRITE_CHUNK_BYTES])
        await writer.drain()
