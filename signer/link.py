"""Link shaping for emulated channels: added one-way latency and a bandwidth cap.

Reproduces a slow vsock on a laptop. A DelayLine releases items in order, each
no earlier than its arrival + serialization time at the capped bandwidth + the
one-way latency; items keep flowing while earlier ones are "on the wire".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from schemas.transport import LinkShaping

T = TypeVar("T")


class DelayLine(Generic[T]):
    def __init__(self, shaping: LinkShaping, sink: Callable[[T], Awaitable[None]]) -> None:
        self.shaping = shaping
        self._sink = sink
        self._queue: asyncio.Queue[tuple[float, T]] = asyncio.Queue()
        self._wire_free_at = 0.0

    def push(self, item: T, size: int) -> None:
        now = asyncio.get_running_loop().time()
        start = max(now, self._wire_free_at)
        if self.shaping.bandwidth_bps > 0:
            start += size / self.shaping.bandwidth_bps
        self._wire_free_at = start
        self._queue.put_nowait((start + self.shaping.latency_s, item))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, item = await self._queue.get()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._sink(item)
