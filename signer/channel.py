"""A persistent channel to one enclave: HELLO, batched frames, multiplexed by correlation id.

The channel is the seam between "what" (batches of requests) and "how bytes
move" (vsock, unix or tcp, chosen by URL in schemas.transport): the host
worker never knows which transport it talks to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import structlog

from schemas import frames
from schemas.transport import open_channel

log = structlog.get_logger("channel")


class ChannelClosed(ConnectionError):
    """The connection to the enclave is gone; requests on it were not answered."""


class CreditWindow:
    """Requests the enclave allows in flight on this channel; the host never exceeds them."""

    def __init__(self, credits: int) -> None:
        self.available = credits
        self._changed = asyncio.Condition()

    async def acquire(self, n: int) -> int:
        """Take up to n credits (at least one), waiting while none are available."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.available > 0)
            taken = min(n, self.available)
            self.available -= taken
            return taken

    async def release(self, n: int) -> None:
        async with self._changed:
            self.available += n
            self._changed.notify_all()


class EnclaveChannel:
    def __init__(self, url: str, hello_timeout: float = 10.0) -> None:
        self.url = url
        self.hello_timeout = hello_timeout
        self.enclave_id = ""
        self.credits = CreditWindow(0)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closed_reason: str | None = "not connected"
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._closed_reason is None

    async def connect(self) -> None:
        reader, writer = await open_channel(self.url)
        try:
            async with asyncio.timeout(self.hello_timeout):
                hello = await frames.read_frame(reader)
        except BaseException:
            writer.close()
            raise
        if hello.get("t") != frames.HELLO or hello.get("proto") != frames.PROTOCOL_VERSION:
            writer.close()
            raise ChannelClosed(f"{self.url}: bad HELLO (protocol {hello.get('proto')!r})")
        self.enclave_id = str(hello.get("enclave_id", ""))
        self.credits = CreditWindow(int(hello.get("credits", 0)))
        self._writer = writer
        self._closed_reason = None
        self._closing = False
        self._reader_task = asyncio.create_task(self._read_loop(reader), name=f"channel-read {self.url}")
        log.info("channel_connected", url=self.url, enclave_id=self.enclave_id,
                 credits=self.credits.available)  # fmt: skip

    async def sign(self, requests: list[dict[str, Any]], max_batch: int) -> list[dict[str, Any]]:
        """Sign a batch; returns one result map per request, in order. Raises ChannelClosed."""
        futures: list[asyncio.Future[dict[str, Any]]] = []
        i = 0
        while i < len(requests):
            n = await self.credits.acquire(min(max_batch, len(requests) - i))
            items = []
            for req in requests[i : i + n]:
                corr_id = next(self._ids)
                fut = self._expect(corr_id)
                futures.append(fut)
                items.append([corr_id, req])
            await self._send({"t": frames.SIGN, "items": items})
            i += n
        return list(await asyncio.gather(*futures))

    async def key_op(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        corr_id = next(self._ids)
        fut = self._expect(corr_id)
        await self._send({"t": frames.KEY_OP, "id": corr_id, "op": op, "args": args})
        return await fut

    async def close(self) -> None:
        self._fail_pending("channel closed by host")
        self._closing = True
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task

    def _expect(self, corr_id: int) -> asyncio.Future[dict[str, Any]]:
        if self._closed_reason is not None:
            raise ChannelClosed(f"{self.url}: {self._closed_reason}")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[corr_id] = fut
        return fut

    async def _send(self, body: dict[str, Any]) -> None:
        if self._writer is None or self._closed_reason is not None:
            raise ChannelClosed(f"{self.url}: {self._closed_reason}")
        frames.write_frame(self._writer, body)
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            self._fail_pending(f"write failed: {type(exc).__name__}")
            raise ChannelClosed(f"{self.url}: write failed") from exc

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        reason = "enclave closed the connection"
        try:
            while True:
                body = await frames.read_frame(reader)
                t = body["t"]
                if t == frames.RESULTS:
                    items = body.get("items") or []
                    for corr_id, result in items:
                        fut = self._pending.pop(corr_id, None)
                        if fut is not None and not fut.done():
                            fut.set_result(result)
                    await self.credits.release(int(body.get("credits", len(items))))
                elif t == frames.KEY_OP_RESULT:
                    fut = self._pending.pop(body.get("id"), None)  # type: ignore[arg-type]
                    if fut is not None and not fut.done():
                        fut.set_result(body)
                elif t == frames.ERROR:
                    reason = f"enclave error {body.get('code')}: {body.get('message')}"
                    break
                else:
                    reason = f"unexpected frame type {t[:32]!r}"
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except frames.FrameError as exc:
            reason = f"bad frame from enclave: {exc}"
        except (ValueError, TypeError) as exc:
            reason = f"malformed results frame: {type(exc).__name__}"
        if not self._closing:
            log.warning("channel_lost", url=self.url, reason=reason)
        self._fail_pending(reason)
        if self._writer is not None:
            self._writer.close()

    def _fail_pending(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{self.url}: {reason}"))
