"""Host <-> enclave frames: length-prefixed msgpack maps, each carrying a batch.

Layout: a 4-byte big-endian body length, then a msgpack map with ``t`` (frame
type). Frames carry *batches* (``items``) because per-request framing is what
makes small-message vsock slow (~140-180k msgs/s per stream at 64 B versus
~10 Gbit/s at 16-64 KiB writes).

Frame types:

- ``hello``  enclave -> host, first frame: ``proto``, ``enclave_id``, ``credits``
- ``sign``   host -> enclave: ``items`` = [[corr_id, SignRequest bytes], ...]
  (the request exactly as the producer encoded it; the enclave decodes it again)
- ``results`` enclave -> host: ``items`` = [[corr_id, SignResult map], ...],
  ``credits`` = credits returned with this batch
- ``key_op`` / ``key_op_result``: key management, correlated by ``id``
- ``ping`` / ``pong``: heartbeats, ``id`` echoed
- ``error``: either way, a reason before closing: ``code`` (a catalogue code on the frame
  surface, schemas.refusals), ``message``
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

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
    """A frame that cannot be accepted; the connection carrying it is closed."""


def encode_frame(body: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > max_bytes:
        raise FrameError(Code.FRAME_TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    return _LEN.pack(len(data)) + data


def decode_body(data: bytes, max_containers: int | None = None) -> dict[str, Any]:
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


async def read_frame(
    reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES, max_containers: int | None = None
) -> dict[str, Any]:
    """Read one frame; raise FrameError on a bad frame, IncompleteReadError on EOF."""
    head = await reader.readexactly(HEADER_BYTES)
    (size,) = _LEN.unpack(head)
    if size > max_bytes:
        raise FrameError(Code.FRAME_TOO_LARGE, f"announced {size} bytes > {max_bytes}")
    return decode_body(await reader.readexactly(size), max_containers)


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
