"""The enclave worker's frame server: HELLO, then batches in and batches out.

Serves on vsock on Nitro, or a Unix/TCP socket when emulated. A corrupt or
oversized frame closes that connection with a logged reason; it never takes
down the process or the other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import Any

import msgpack
import structlog

from schemas import frames
from schemas.transport import serve_channel

from .service import SigningService
from .wallets import WalletStore

log = structlog.get_logger("enclave")

BatchHandler = Callable[[list[Any]], list[list[Any]]]


def noop_batch(items: list[Any]) -> list[list[Any]]:
    """Benchmark/test handler: no key, no signature; a deterministic digest of the request
    stands in for the signature so tests can check exactly-once delivery and determinism."""
    out = []
    for corr_id, raw in items:
        t0 = time.perf_counter_ns()
        try:
            rid = msgpack.unpackb(raw, raw=False).get("request_id", "")
        except Exception:
            rid = ""
        out.append(
            [
                corr_id,
                {
                    "v": 1,
                    "request_id": rid,
                    "key_id": "",
                    "status": "ok",
                    "signature": hashlib.sha256(raw).digest(),
                    "timings_us": {"enclave_service": (time.perf_counter_ns() - t0) // 1000},
                },
            ]
        )
    return out


class EnclaveServer:
    def __init__(self, url: str, enclave_id: str, credits: int = 4096, handler: str = "sign") -> None:
        self.url = url
        self.enclave_id = enclave_id
        self.credits = credits
        self.wallets = WalletStore()
        self.service = SigningService(enclave_id, self.wallets)
        self._sign_batch: BatchHandler = self.service.sign_batch if handler == "sign" else noop_batch
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await serve_channel(self.url, self._on_connection)
        log.info("enclave_listening", url=self.url, enclave_id=self.enclave_id)

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames.limit_write_buffer(writer)
        try:
            hello = {
                "t": frames.HELLO,
                "proto": frames.PROTOCOL_VERSION,
                "enclave_id": self.enclave_id,
                "credits": self.credits,
            }
            await frames.write_frame(writer, frames.encode_frame(hello))
            while True:
                body = await frames.read_frame(reader)
                reply = self._handle(body)
                if reply is not None:
                    await frames.write_frame(writer, frames.encode_frame(reply))
        except asyncio.IncompleteReadError:
            log.info("channel_closed")
        except frames.FrameError as exc:
            log.warning("channel_dropped", reason=exc.code, detail=str(exc))
            with contextlib.suppress(Exception):
                error = {"t": frames.ERROR, "code": exc.code, "message": str(exc)[:200]}
                await frames.write_frame(writer, frames.encode_frame(error))
        except ConnectionError as exc:
            log.info("channel_lost", error=type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _handle(self, body: dict[str, Any]) -> dict[str, Any] | None:
        t = body["t"]
        if t == frames.SIGN:
            items = body.get("items")
            if type(items) is not list or not all(
                type(i) is list and len(i) == 2 and type(i[0]) is int and type(i[1]) is bytes for i in items
            ):
                raise frames.FrameError("corrupt_frame", "sign frame items must be [[int, bytes], ...]")
            # credits come back with the results: the host may send this many more
            return {"t": frames.RESULTS, "items": self._sign_batch(items), "credits": len(items)}
        if t == frames.PING:
            return {"t": frames.PONG, "id": body.get("id")}
        if t == frames.KEY_OP:
            return self._key_op(body)
        raise frames.FrameError("unknown_frame", f"unexpected frame type {t[:32]!r}")

    def _key_op(self, body: dict[str, Any]) -> dict[str, Any]:
        op, args = body.get("op"), body.get("args")
        reply: dict[str, Any] = {"t": frames.KEY_OP_RESULT, "id": body.get("id")}
        if type(args) is not dict:
            args = {}
        try:
            if op == "keys.create":
                wallet = self.wallets.create(str(args.get("scheme")))
                log.info("key_created", key_id=wallet.key_id, scheme=wallet.scheme)
                reply.update(ok=True, result=wallet.describe())
            elif op == "keys.list":
                reply.update(ok=True, result={"keys": [w.describe() for w in self.wallets.list()]})
            else:
                reply.update(ok=False, error={"code": "unknown_op", "message": f"unknown op {str(op)[:40]!r}"})
        except ValueError as exc:
            reply.update(ok=False, error={"code": "invalid_argument", "message": str(exc)})
        return reply
