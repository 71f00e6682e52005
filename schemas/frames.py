"""Host <-> enclave frames: length-prefixed msgpack maps, each carrying a batch.

Layout: a 4-byte big-endian body length, then a msgpack map with ``t`` (frame
type). Frames carry *batches* (``items``) because per-request framing is what
makes small-message vsock slow.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
# vsock writes of 32 KiB or more have hit a kernel bug: hand the transport smaller pieces
WRITE_CHUNK_BYTES = 16 * 1024

HELLO = "hello"  # enclave -> host: proto, enclave_id, credits
SIGN = "sign"  # host -> enclave: items = [[corr_id, SignRequest map], ...]
RESULTS = "results"  # enclave -> host: items = [[corr_id, SignResult map], ...], credits
KEY_OP = "key_op"  # host -> enclave: id, op, args
KEY_OP_RESULT = "key_op_result"  # enclave -> host: id, ok, result | error
ERROR = "error"  # either way, before closing: code, message

_LEN = struct.Struct(">I")


class FrameError(Exception):
    """A frame that cannot be accepted; the connection carrying it is closed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def encode_frame(body: dict[str, Any]) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_FRAME_BYTES:
        raise FrameError("frame_too_large", f"{len(data)} bytes > {MAX_FRAME_BYTES}")
    return _LEN.pack(len(data)) + data


def decode_body(data: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError("corrupt_frame", f"undecodable body ({type(exc).__name__})") from None
    if type(body) is not dict or type(body.get("t")) is not str:
        raise FrameError("corrupt_frame", "frame body is not a map with a type")
    return body


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Read one frame; raise FrameError on a bad frame, IncompleteReadError on EOF."""
    head = await reader.readexactly(_LEN.size)
    (size,) = _LEN.unpack(head)
    if size > max_bytes:
        raise FrameError("frame_too_large", f"announced {size} bytes > {max_bytes}")
    return decode_body(await reader.readexactly(size))


def write_frame(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    data = encode_frame(body)
    view = memoryview(data)
    for i in range(0, len(data), WRITE_CHUNK_BYTES):
        writer.write(view[i : i + WRITE_CHUNK_BYTES])
