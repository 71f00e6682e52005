"""Frame encoding: length prefix, size limits, and writes chunked below 32 KiB."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from schemas import frames


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
