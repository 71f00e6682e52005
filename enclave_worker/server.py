"""The enclave worker's frame server: HELLO, then batches in and batches out.

Serves on vsock on Nitro, or a Unix/TCP socket when emulated. A corrupt or
oversized frame closes that connection with a logged reason; it never takes
down the process or the other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from schemas import frames
from schemas.transport import serve_channel

from .service import SigningService
from .wallets import WalletStore

log = structlog.get_logger("enclave")


class EnclaveServer:
    def __init__(self, url: str, enclave_id: str, credits: int = 4096) -> None:
        self.url = url
        self.enclave_id = enclave_id
        self.credits = credits
        self.wallets = WalletStore()
        self.service = SigningService(enclave_id, self.wallets)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

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
        peer = "host"
        frames.write_frame(
            writer,
            {"t": frames.HELLO, "proto": frames.PROTOCOL_VERSION,
             "enclave_id": self.enclave_id, "credits": self.credits},
        )  # fmt: skip
        try:
            while True:
                body = await frames.read_frame(reader)
                reply = self._handle(body)
                if reply is not None:
                    frames.write_frame(writer, reply)
                    await writer.drain()
        except asyncio.IncompleteReadError:
            log.info("channel_closed", peer=peer)
        except frames.FrameError as exc:
            log.warning("channel_dropped", reason=exc.code, detail=str(exc))
            with contextlib.suppress(Exception):
                frames.write_frame(writer, {"t": frames.ERROR, "code": exc.code, "message": str(exc)})
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
            if type(items) is not list:
                raise frames.FrameError("corrupt_frame", "sign frame without an items list")
            results = self.service.sign_batch(items)
            return {"t": frames.RESULTS, "items": results, "credits": len(items)}
        if t == frames.KEY_OP:
            return self._key_op(body)
        raise frames.FrameError("unknown_frame", f"unexpected frame type {t[:32]!r}")

    def _key_op(self, body: dict[str, Any]) -> dict[str, Any]:
        op, args = body.get("op"), body.get("args") or {}
        reply: dict[str, Any] = {"t": frames.KEY_OP_RESULT, "id": body.get("id")}
        try:
            if op == "keys.create":
                wallet = self.wallets.create(str(args.get("scheme")))
                log.info("key_created", key_id=wallet.key_id, scheme=wallet.scheme)
                reply.update(ok=True, result=wallet.describe())
            elif op == "keys.list":
                reply.update(ok=True, result={"keys": [w.describe() for w in self.wallets.list()]})
            else:
                reply.update(ok=False, error={"code": "unknown_op", "message": f"unknown op {op!r}"})
        except ValueError as exc:
            reply.update(ok=False, error={"code": "invalid_argument", "message": str(exc)})
        return reply
