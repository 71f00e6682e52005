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

from .auth import Authenticator
from .keyring import KeyringEnvelope, SealedKey
from .service import Deferred, SigningService
from .vault import Vault, VaultError
from .wallets import KEY_SCHEMES

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
    def __init__(
        self,
        url: str,
        enclave_id: str,
        credits: int = 4096,
        handler: str = "sign",
        vault: Vault | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        if handler == "sign" and vault is None:
            raise ValueError("the sign handler needs a vault (KMS endpoint and attestation provider)")
        self.url = url
        self.enclave_id = enclave_id
        self.credits = credits
        self.handler = handler
        self.vault = vault
        self.service = SigningService(enclave_id, vault, auth) if vault is not None else None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await serve_channel(self.url, self._on_connection)
        log.info("enclave_listening", url=self.url, enclave_id=self.enclave_id, handler=self.handler)

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):  # connections end before the vault closes under them
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            await self._server.wait_closed()
        if self.vault is not None:
            await self.vault.close()

    def stats(self) -> dict[str, Any]:
        """Counters for the host to export (the enclave has no network of its own)."""
        if self.vault is None:
            return {}
        v = self.vault
        counters = ("kms_decrypt", "kms_generate_data_key", "unwraps", "unwrap_joined", "unwrap_keys")
        return {
            **{k: int(v.stats.get(k, 0)) for k in counters},
            "kms_calls": v.kms.calls,
            "kms_throttles": v.kms.throttles,
            "unwrap_hist": {"bounds": v.unwrap_bounds, "counts": list(v.unwrap_counts), "sum": v.unwrap_seconds},
            "cache_hits": v.cache.hits,
            "cache_misses": v.cache.misses,
            "cache_evictions": v.cache.evictions,
            "cache_entries": len(v.cache),
            "keys_loaded": len(v.sealed),
        }

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames.limit_write_buffer(writer)
        conn = _Connection(self, writer)
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
        try:
            hello = {
                "t": frames.HELLO,
                "proto": frames.PROTOCOL_VERSION,
                "enclave_id": self.enclave_id,
                "credits": self.credits,
            }
            await conn.send(hello)
            while True:
                await conn.handle(await frames.read_frame(reader))
        except asyncio.IncompleteReadError:
            log.info("channel_closed")
        except frames.FrameError as exc:
            log.warning("channel_dropped", reason=exc.code, detail=str(exc))
            with contextlib.suppress(Exception):
                await conn.send({"t": frames.ERROR, "code": exc.code, "message": str(exc)[:200]})
        except ConnectionError as exc:
            log.info("channel_lost", error=type(exc).__name__)
        except asyncio.CancelledError:
            # shutdown: this handler is the connection's owner and ends it here; re-raising would
            # only make asyncio's stream callback log the cancellation as an error
            log.info("channel_closed_for_shutdown")
        finally:
            if me is not None:
                self._handlers.discard(me)
            await conn.cancel_tasks()  # the host re-dispatches what was not answered
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Connection:
    """One host connection: frames out under a lock, and the tasks serving its slow requests."""

    def __init__(self, server: EnclaveServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, body: dict[str, Any]) -> None:
        data = frames.encode_frame(body)
        async with self._lock:
            await frames.write_frame(self.writer, data)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def handle(self, body: dict[str, Any]) -> None:
        t = body["t"]
        if t == frames.SIGN:
            items = body.get("items")
            if type(items) is not list or not all(
                type(i) is list and len(i) == 2 and type(i[0]) is int and type(i[1]) is bytes for i in items
            ):
                raise frames.FrameError("corrupt_frame", "sign frame items must be [[int, bytes], ...]")
            service = self.server.service
            if service is None:
                await self.send({"t": frames.RESULTS, "items": noop_batch(items), "credits": len(items)})
                return
            ready, deferred = service.sign_batch(items)
            # credits come back with the results: the host may send this many more
            if ready:
                await self.send({"t": frames.RESULTS, "items": ready, "credits": len(ready)})
            if deferred:
                self.spawn(self._finish_deferred(service, deferred))
        elif t == frames.PING:
            await self.send({"t": frames.PONG, "id": body.get("id"), "stats": self.server.stats()})
        elif t == frames.KEY_OP:
            self.spawn(self._key_op(body))
        else:
            raise frames.FrameError("unknown_frame", f"unexpected frame type {t[:32]!r}")

    async def _finish_deferred(self, service: SigningService, deferred: list[Deferred]) -> None:
        results = await service.sign_deferred(deferred)
        await self.send({"t": frames.RESULTS, "items": results, "credits": len(results)})

    async def _key_op(self, body: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"t": frames.KEY_OP_RESULT, "id": body.get("id")}
        try:
            reply.update(ok=True, result=await self._run_op(body.get("op"), body.get("args")))
        except VaultError as exc:
            reply.update(ok=False, error={"code": exc.code, "message": exc.message})
        except (ValueError, TypeError, KeyError) as exc:
            reply.update(ok=False, error={"code": "invalid_argument", "message": str(exc)[:200]})
        await self.send(reply)

    async def _run_op(self, op: Any, args: Any) -> dict[str, Any]:
        vault = self.server.vault
        if vault is None:
            raise VaultError("unsupported", "this enclave worker has no vault (noop handler)")
        if type(args) is not dict:
            raise ValueError("args must be a map")
        if op == "keyrings.load":
            envelopes = [KeyringEnvelope.from_wire(m) for m in args.get("envelopes", [])]
            keys = [SealedKey.from_wire(m) for m in args.get("keys", [])]
            vault.load(envelopes, keys)
            return {"keyrings": len(vault.current), "keys": len(vault.sealed)}
        if op == "keys.create":
            result = await vault.create_key(
                _name(args, "keyring"), _scheme(args), str(args.get("kms_key_id") or ""), args.get("policy")
            )
            log.info("key_created", key_id=result["key"]["key_id"], keyring=result["key"]["keyring"])
            return result
        if op == "keys.import_target":
            return {**vault.import_target(), "enclave_id": self.server.enclave_id}
        if op == "keys.import":
            encrypted = args.get("encrypted_key")
            if type(encrypted) is not bytes:
                raise ValueError("encrypted_key must be bytes")
            result = await vault.import_key(_name(args, "keyring"), _scheme(args), str(args.get("kms_key_id") or ""),
                                            encrypted, args.get("policy"))  # fmt: skip
            log.info("key_imported", key_id=result["key"]["key_id"], keyring=result["key"]["keyring"])
            return result
        if op == "keys.rotate_dek":
            result = await vault.rotate_dek(_name(args, "keyring"), str(args.get("kms_key_id") or ""))
            log.info("dek_rotated", keyring=args["keyring"], keys=len(result["sealed"]))
            return result
        if op == "keys.list":
            return {"keys": [k.describe() for k in vault.sealed.values()]}
        if op == "kms.credentials":
            ak, sk, token = args.get("access_key_id"), args.get("secret_access_key"), args.get("session_token")
            if (
                type(ak) is not str
                or type(sk) is not str
                or not ak
                or not sk
                or (token is not None and type(token) is not str)
            ):
                raise ValueError("kms.credentials needs access_key_id, secret_access_key (and optional session_token)")
            vault.kms.set_credentials(ak, sk, token)
            log.info("kms_credentials_updated", access_key_id=ak[:4] + "...")
            return {"updated": True}
        raise VaultError("unknown_op", f"unknown op {str(op)[:40]!r}")


def _name(args: dict[str, Any], field: str) -> str:
    value = args.get(field)
    if type(value) is not str or not 1 <= len(value) <= 64 or not value.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{field} must be 1-64 letters, digits, '-' or '_'")
    return value


def _scheme(args: dict[str, Any]) -> str:
    scheme = args.get("scheme")
    if scheme not in KEY_SCHEMES:
        raise ValueError(f"unknown key scheme {scheme!r}, expected one of {KEY_SCHEMES}")
    return str(scheme)
