"""Frame encoding: length prefix, size limits, writes chunked below 32 KiB, and the typed frames'
strict decoding (every malformed shape refused with its catalogue code)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from schemas import frames
from schemas.refusals import Code, Refused


class _RecordingWriter:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append(bytes(data))

    async def drain(self) -> None:
        return None


def test_frame_is_length_prefixed_msgpack() -> None:
    data = frames.encode_frame({"t": frames.PING, "id": 3})
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert frames.decode_body(data[4:]) == {"t": "ping", "id": 3}


def test_oversized_frames_are_refused_when_encoding() -> None:
    with pytest.raises(frames.FrameError) as info:
        frames.encode_frame({"t": frames.SIGN, "items": [[1, bytes(2000)]]}, max_bytes=1000)
    assert info.value.code == "frame_too_large"


@pytest.mark.parametrize("body", [b"\xc1", msgpack.packb([1]), msgpack.packb({"t": 5}), msgpack.packb({"x": "y"})])
def test_bodies_that_are_not_typed_maps_are_corrupt(body: bytes) -> None:
    with pytest.raises(frames.FrameError) as info:
        frames.decode_body(body)
    assert info.value.code == "corrupt_frame"


def test_large_frames_are_written_in_pieces_below_32_kib() -> None:
    data = frames.encode_frame({"t": frames.SIGN, "items": [[i, bytes(1000)] for i in range(200)]})
    writer = _RecordingWriter()
    asyncio.run(frames.write_frame(writer, data))  # type: ignore[arg-type]
    assert b"".join(writer.writes) == data
    assert len(writer.writes) > 1 and max(len(w) for w in writer.writes) <= frames.WRITE_CHUNK_BYTES < 32 * 1024


async def test_reader_refuses_an_announced_oversized_frame() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data((frames.MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(frames.FrameError) as info:
        await frames.read_frame(reader)
    assert info.value.code == "frame_too_large"


# -- typed frames ------------------------------------------------------------------------------------

ROUND_TRIPS = [
    frames.HelloFrame(frames.PROTOCOL_VERSION, "enc-0", 4096),
    frames.SignFrame([[1, b"request"], [2, b""]]),
    frames.SignFrame([]),
    frames.ResultsFrame([[1, {"v": 1, "status": "ok", "signature": b"s"}]], 1),
    frames.KeyOpFrame(7, "keys.list", {"nonce": b"n" * 16}),
    frames.KeyOpResultFrame.success(7, {"keys": []}),
    frames.KeyOpResultFrame.refusal(8, Refused(Code.UNKNOWN_OP, "unknown op 'x'")),
    frames.PingFrame(3),
    frames.PongFrame(3, {"cache_hits": 1}),
    frames.PongFrame(3),
    frames.ErrorFrame.of(frames.FrameError(Code.CREDITS_EXCEEDED, "9 requests outstanding, 8 granted")),
]


@pytest.mark.parametrize("frame", ROUND_TRIPS, ids=lambda f: type(f).__name__)
def test_typed_frames_round_trip(frame: frames.Frame) -> None:
    data = frame.encode()
    assert frames.decode_frame(data[frames.HEADER_BYTES :]) == frame
    assert frames.decode_body(data[frames.HEADER_BYTES :]) == frame.to_wire()
    assert frame.to_wire()["t"] == frame.TYPE and frames.FRAME_TYPES[frame.TYPE] is type(frame)


def test_every_frame_type_has_a_class() -> None:
    types = (frames.HELLO, frames.SIGN, frames.RESULTS, frames.KEY_OP, frames.KEY_OP_RESULT, frames.PING,
             frames.PONG, frames.ERROR)  # fmt: skip
    assert set(frames.FRAME_TYPES) == set(types)


def test_sign_items_are_kept_as_decoded() -> None:
    body = {"t": frames.SIGN, "items": [[1, b"a"], [2, b"b"]], "later_field": 1}  # unknown keys are ignored
    assert frames.SignFrame.from_wire(body).items is body["items"]  # no object per request


_MANY = [[i, b"x"] for i in range(frames.MAX_ITEMS + 1)]
_OK_RESULT = {"v": 1}

# (body, the code it is refused with)
MALFORMED: list[tuple[Any, Code]] = [
    # not a typed map at all
    (b"\xc1", Code.CORRUPT_FRAME),
    ([1], Code.CORRUPT_FRAME),
    ({"x": "y"}, Code.CORRUPT_FRAME),
    ({"t": 5}, Code.CORRUPT_FRAME),
    ({"t": "launch_missiles"}, Code.UNKNOWN_FRAME),
    # hello
    ({"t": "hello", "proto": "1", "enclave_id": "e", "credits": 1}, Code.CORRUPT_FRAME),
    ({"t": "hello", "proto": True, "enclave_id": "e", "credits": 1}, Code.CORRUPT_FRAME),
    ({"t": "hello", "proto": 1, "credits": 1}, Code.CORRUPT_FRAME),
    ({"t": "hello", "proto": 1, "enclave_id": 5, "credits": 1}, Code.CORRUPT_FRAME),
    ({"t": "hello", "proto": 1, "enclave_id": "e" * 129, "credits": 1}, Code.CORRUPT_FRAME),
    ({"t": "hello", "proto": 1, "enclave_id": "e"}, Code.CORRUPT_FRAME),
    ({"t": "hello", "proto": 1, "enclave_id": "e", "credits": -1}, Code.CORRUPT_FRAME),
    ({"t": "hello", "proto": 1, "enclave_id": "e", "credits": 1.0}, Code.CORRUPT_FRAME),
    # sign: [[int, bytes], ...]
    ({"t": "sign"}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": "nope"}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": {"1": b"x"}}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": [[1]]}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": [[1, b"x", 3]]}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": [[True, b"x"]]}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": [["1", b"x"]]}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": [[1, "text"]]}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": [[1, {"not": "bytes"}]]}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": [[1, b"ok"], 5]}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": [b"ab"]}, Code.CORRUPT_FRAME),  # two bytes unpack as two ints
    ({"t": "sign", "items": ["ab"]}, Code.CORRUPT_FRAME),
    ({"t": "sign", "items": [{1: 0, b"k": 0}]}, Code.CORRUPT_FRAME),  # a map's keys unpack as int, bytes
    ({"t": "sign", "items": _MANY}, Code.CORRUPT_FRAME),
    # results: [[int, map], ...] and credits >= 0
    ({"t": "results", "items": "nope", "credits": 1}, Code.CORRUPT_FRAME),
    ({"t": "results", "items": [[1, "not a map"]], "credits": 1}, Code.CORRUPT_FRAME),
    ({"t": "results", "items": [[1.0, _OK_RESULT]], "credits": 1}, Code.CORRUPT_FRAME),
    ({"t": "results", "items": [], "credits": -5}, Code.CORRUPT_FRAME),
    ({"t": "results", "items": [[1, _OK_RESULT]]}, Code.CORRUPT_FRAME),
    ({"t": "results", "items": [[1, _OK_RESULT]], "credits": False}, Code.CORRUPT_FRAME),
    # key_op: an int id (op and args are refused in a key_op_result, see below)
    ({"t": "key_op", "op": "keys.list", "args": {}}, Code.CORRUPT_FRAME),
    ({"t": "key_op", "id": "1", "op": "keys.list", "args": {}}, Code.CORRUPT_FRAME),
    ({"t": "key_op", "id": True, "op": "keys.list", "args": {}}, Code.CORRUPT_FRAME),
    # key_op_result
    ({"t": "key_op_result", "ok": True, "result": {}}, Code.CORRUPT_FRAME),
    ({"t": "key_op_result", "id": 1, "ok": 1, "result": {}}, Code.CORRUPT_FRAME),
    ({"t": "key_op_result", "id": 1, "ok": True}, Code.CORRUPT_FRAME),
    ({"t": "key_op_result", "id": 1, "ok": True, "result": "done"}, Code.CORRUPT_FRAME),
    ({"t": "key_op_result", "id": 1, "ok": False}, Code.CORRUPT_FRAME),
    ({"t": "key_op_result", "id": 1, "ok": False, "error": "boom"}, Code.CORRUPT_FRAME),
    # ping / pong
    ({"t": "ping"}, Code.CORRUPT_FRAME),
    ({"t": "ping", "id": None}, Code.CORRUPT_FRAME),
    ({"t": "ping", "id": "1"}, Code.CORRUPT_FRAME),
    ({"t": "ping", "id": 1.5}, Code.CORRUPT_FRAME),
    ({"t": "pong", "id": None, "stats": {}}, Code.CORRUPT_FRAME),
    ({"t": "pong", "id": 1, "stats": []}, Code.CORRUPT_FRAME),
    ({"t": "pong", "id": 1, "stats": None}, Code.CORRUPT_FRAME),
    # error
    ({"t": "error", "code": 5, "message": "m"}, Code.CORRUPT_FRAME),
    ({"t": "error", "code": "internal"}, Code.CORRUPT_FRAME),
    ({"t": "error", "code": "x" * 65, "message": "m"}, Code.CORRUPT_FRAME),
    ({"t": "error", "code": "internal", "message": "m" * 1025}, Code.CORRUPT_FRAME),
]


@pytest.mark.parametrize(("body", "code"), MALFORMED, ids=[f"{i}-{c.value}" for i, (_, c) in enumerate(MALFORMED)])
def test_malformed_frames_are_refused_with_their_code(body: Any, code: Code) -> None:
    data = body if type(body) is bytes else msgpack.packb(body, use_bin_type=True)
    with pytest.raises(frames.FrameError) as info:
        frames.decode_frame(data)
    assert info.value.code is code and not isinstance(info.value, frames.KeyOpRejected)
    assert info.value.message  # says what is wrong


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"t": "key_op", "id": 4, "op": 5, "args": {}}, Code.UNKNOWN_OP),
        ({"t": "key_op", "id": 4, "op": "", "args": {}}, Code.UNKNOWN_OP),
        ({"t": "key_op", "id": 4, "op": "x" * 65, "args": {}}, Code.UNKNOWN_OP),
        ({"t": "key_op", "id": 4, "args": {}}, Code.UNKNOWN_OP),
        ({"t": "key_op", "id": 4, "op": "keys.create", "args": "args"}, Code.INVALID_ARGUMENT),
        ({"t": "key_op", "id": 4, "op": "keys.create", "args": [1]}, Code.INVALID_ARGUMENT),
        ({"t": "key_op", "id": 4, "op": "keys.create"}, Code.INVALID_ARGUMENT),
    ],
)
def test_a_key_op_with_bad_op_or_args_is_refused_to_its_id(body: dict[str, Any], code: Code) -> None:
    with pytest.raises(frames.KeyOpRejected) as info:
        frames.decode_frame(msgpack.packb(body))
    assert (info.value.code, info.value.op_id) == (code, 4)
    reply = frames.KeyOpResultFrame.refusal(info.value.op_id, info.value)
    assert reply.to_wire() == {"t": "key_op_result", "id": 4, "ok": False, "error": info.value.to_wire()}


def test_a_frame_of_too_many_containers_is_too_complex() -> None:
    data = msgpack.packb({"t": frames.SIGN, "items": [{}] * 100})
    with pytest.raises(frames.FrameError) as info:
        frames.decode_frame(data, max_containers=50)
    assert info.value.code is Code.FRAME_TOO_COMPLEX


def test_a_frame_without_a_handler_is_unexpected() -> None:
    assert frames.unexpected(frames.PingFrame(1)).code is Code.UNKNOWN_FRAME


async def test_typed_frames_are_read_from_a_stream() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(frames.PingFrame(5).encode() + frames.encode_frame({"t": frames.PING, "id": "5"}))
    reader.feed_eof()
    assert await frames.receive_frame(reader) == frames.PingFrame(5)
    with pytest.raises(frames.FrameError) as info:
        await frames.receive_frame(reader)
    assert info.value.code is Code.CORRUPT_FRAME
    with pytest.raises(asyncio.IncompleteReadError):
        await frames.receive_frame(reader)
