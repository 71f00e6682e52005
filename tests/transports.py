"""Test transports around any schemas.transport Transport: one that corrupts or cuts the bytes it
carries, one that records them. Use them in-process (``connect``/``serve``), or between processes
with ``relay(listen)``: serve on ``listen`` and carry each accepted connection to the inner
transport (``Direction.OUT`` is towards the inner transport's peer)."""

from __future__ import annotations

import asyncio

from schemas.frames import WRITE_CHUNK_BYTES
from schemas.transport import Direction, LinkTransport, Transport


class FaultyTransport(LinkTransport):
    """Faults on the bytes going OUT, each armed for one chunk: ``corrupt_next`` flips the fifth byte
    of the next chunk longer than 8 bytes (the first byte of a frame body); ``cut_next`` forwards
    half of the next chunk, then drops the connection."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.corrupt_next = False
        self.cut_next = False
        self.corrupted = 0
        self.cuts = 0

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
        while data := await reader.read(WRITE_CHUNK_BYTES):
            if direction is Direction.OUT and self.corrupt_next and len(data) > 8:
                self.corrupt_next = False
                self.corrupted += 1
                data = data[:4] + bytes([data[4] ^ 0xFF]) + data[5:]  # one flipped byte
            if direction is Direction.OUT and self.cut_next:
                self.cut_next = False
                self.cuts += 1
                writer.write(data[: len(data) // 2])  # half a frame, then the link drops
                writer.close()
                return
            writer.write(data)
            await writer.drain()


class RecordingTransport(LinkTransport):
    """Keeps every byte it carries, both ways, in ``captured`` (and per direction in ``sent`` and
    ``received``)."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.captured = bytearray()
        self.sent = bytearray()  # OUT
        self.received = bytearray()  # IN

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
        mine = self.sent if direction is Direction.OUT else self.received
        while data := await reader.read(WRITE_CHUNK_BYTES):
            self.captured += data
            mine += data
            writer.write(data)
            await writer.drain()
