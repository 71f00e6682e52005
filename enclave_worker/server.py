"""The enclave worker's frame server: HELLO, then batches in and batches out.

Serves on vsock on Nitro, or a Unix/TCP socket when emulated (any
schemas.transport Transport: the URL's, or one given). Frames are decoded into
typed frames (schemas.frames) and handed to their handler from one table. A
corrupt, oversized or unexpected frame closes that connection with a logged
reason; it never takes down the process or the other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from schemas import frames
from schemas.names import NAME_RULE, valid_name
from schemas.refusals import Code, Refused
from schemas.transport import Server, Transport, transport_for

from .auth import Authenticator
from .keyring import KeyringEnvelope, SealedKey, policy_shape_ok
from .noop import NoopService, noop_batch  # noqa: F401 - noop_batch: the scripted enclaves' answer
from .operations import Identity, Operation, OperationVerifier
from .service import Deferred, SigningService
from .vault import Vault
from .wallets import KEY_SCHEMES

log = structlog.get_logger("enclave")

BatchHandler = Callable[[list[Any]], list[list[Any]]]


MAX_CONNECTIONS = 64  # host connections served at once; more are closed at once
MAX_KEY_OPS_IN_FLIGHT = frames.MAX_KEY_OPS_IN_FLIGHT  # per connection; a host that sends more loses the connection
MAX_LOAD_ENVELOPES = 1_000  # per keyrings.load frame
MAX_LOAD_KEYS = 5_000  # per keyrings.load frame
MAX_LIST_KEYS = 10_000
MAX_ENVELOPES = 10_000  # keyring versions held (each at most ~1.5 KiB)
MAX_DEFERRED_BYTES = 32 * 1024 * 1024  # request bytes per connection waiting for a keyring unwrap


class EnclaveServer:
    def __init__(
        self,
        url: str,
        enclave_id: str,
        credits: int = 4096,
        handler: str = "sign",
        vault: Vault | None = None,
        auth: Authenticator | None = None,
        transport: Transport | None = None,
    ) -> None:
        if handler == "sign" and vault is None:
            raise ValueError("the sign handler needs a vault (KMS endpoint and attestation provider)")
        self.url = url
        self.transport = transport if transport is not None else transport_for(url)
        self.enclave_id = enclave_id
        self.credits = credits
        self.handler = handler
        self.vault = vault
        self.identity = Identity()
        self.operations = OperationVerifier(vault.config, self.identity) if vault is not None else None
        self.service: SigningService | NoopService = (
            SigningService(enclave_id, vault, auth) if vault is not None else NoopService()
        )
        self._server: Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.key_ops: dict[str, KeyOpHandler] = {
            "keyrings.load": self._op_load,
            "enclave.identity": self._op_identity,
            "keys.create": self._op_create,
            "keys.import": self._op_import,
            "keys.rotate_dek": self._op_rotate,
            "keys.list": self._op_list,
            "kms.credentials": self._op_credentials,
        }

    async def start(self) -> None:
        self._server = await self.transport.serve(self._on_connection)
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
        return self.vault.stats_snapshot() if self.vault is not None else {}

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= MAX_CONNECTIONS:
            log.warning("channel_refused", reason="too_many_connections", limit=MAX_CONNECTIONS)
            writer.close()
            return
        frames.limit_write_buffer(writer)
        conn = _Connection(self, writer)
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
        try:
            await conn.send(frames.HelloFrame(frames.PROTOCOL_VERSION, self.enclave_id, self.credits))
            while True:
                try:
                    frame = await frames.receive_frame(reader, frames.HOST_FRAME_BYTES, frames.HOST_FRAME_CONTAINERS)
                except frames.KeyOpRejected as exc:  # every key operation gets a typed reply
                    await conn.send(frames.KeyOpResultFrame.refusal(exc.op_id, exc))
                    continue
                await conn.handle(frame)
        except asyncio.IncompleteReadError:
            log.info("channel_closed")
        except frames.FrameError as exc:
            log.warning("channel_dropped", reason=exc.code, detail=str(exc))
            with contextlib.suppress(Exception):
                await conn.send(frames.ErrorFrame.of(exc))
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

    # -- key operations (a table: operation name -> handler) -------------------------------------

    def _vault(self) -> Vault:
        if self.vault is None:
            raise Refused(Code.UNSUPPORTED, "this enclave worker has no vault (noop handler)")
        return self.vault

    def _signed(self, op: str, args: Any) -> Operation:
        self._vault()
        assert self.operations is not None
        return self.operations.verify(op, args)

    async def _op_load(self, args: dict[str, Any]) -> dict[str, Any]:
        vault = self._vault()
        envs, keys = args.get("envelopes", []), args.get("keys", [])
        if type(envs) is not list or len(envs) > MAX_LOAD_ENVELOPES:
            raise Refused(Code.INVALID_ARGUMENT, f"envelopes must be a list of at most {MAX_LOAD_ENVELOPES}")
        if type(keys) is not list or len(keys) > MAX_LOAD_KEYS:
            raise Refused(Code.INVALID_ARGUMENT, f"keys must be a list of at most {MAX_LOAD_KEYS}")
        envelopes = [KeyringEnvelope.from_wire(m) for m in envs]  # a RecordError is the refusal (invalid_record)
        sealed = [SealedKey.from_wire(m) for m in keys]
        # keys past the vault's bounds push out the least recently used ones (pushed again when needed)
        new_envs = {(e.keyring_id, e.dek_version) for e in envelopes} - vault.envelopes.keys()
        if len(vault.envelopes) + len(new_envs) > MAX_ENVELOPES:
            raise Refused(Code.TOO_MANY_KEYS, f"this enclave holds at most {MAX_ENVELOPES:,} keyring versions")
        vault.load(envelopes, sealed)
        return {"keyrings": len(vault.current), "keys": len(vault.sealed)}

    async def _op_identity(self, args: dict[str, Any]) -> dict[str, Any]:
        doc = self._vault().identity_document(self.identity.public_key)
        return {"attestation_document": doc, "enclave_id": self.enclave_id}

    def _receipt(self, operation: Operation, result: dict[str, Any]) -> dict[str, Any]:
        attested = result.pop("attested")
        return {**result, "receipt": self.identity.receipt(operation.op, operation.raw, attested)}

    async def _op_create(self, args: dict[str, Any]) -> dict[str, Any]:
        operation = self._signed("keys.create", args)
        a = operation.args
        result = await self._vault().create_key(_name(a, "keyring"), _scheme(a), _policy(a))
        log.info("key_created", key_id=result["key"]["key_id"], keyring=result["key"]["keyring"],
                 operators=operation.approved_by)  # fmt: skip
        return self._receipt(operation, result)

    async def _op_import(self, args: dict[str, Any]) -> dict[str, Any]:
        operation = self._signed("keys.import", args)
        a = operation.args
        encrypted = args.get("encrypted_key")
        if type(encrypted) is not bytes or len(encrypted) != 256:
            raise Refused(Code.INVALID_ARGUMENT, "encrypted_key must be 256 bytes (RSA-2048 OAEP)")
        if a.get("encrypted_key_sha256") != hashlib.sha256(encrypted).digest():
            raise Refused(Code.OPERATION_MISMATCH, "encrypted_key is not the one the operators approved")
        result = await self._vault().import_key(_name(a, "keyring"), _scheme(a), encrypted, _policy(a))
        log.info("key_imported", key_id=result["key"]["key_id"], keyring=result["key"]["keyring"],
                 operators=operation.approved_by)  # fmt: skip
        return self._receipt(operation, result)

    async def _op_rotate(self, args: dict[str, Any]) -> dict[str, Any]:
        operation = self._signed("keys.rotate_dek", args)
        keyring = _name(operation.args, "keyring")
        expected = args.get("keys_expected")  # the host's count: it can only make its own rotation fail
        if expected is not None and (type(expected) is not int or not 0 <= expected <= 10_000_000):
            raise Refused(Code.INVALID_ARGUMENT, "keys_expected must be an integer between 0 and 10,000,000")
        result = await self._vault().rotate_dek(keyring, expected)
        log.info("dek_rotated", keyring=keyring, keys=len(result["sealed"]), operators=operation.approved_by)
        return self._receipt(operation, result)

    async def _op_list(self, args: dict[str, Any]) -> dict[str, Any]:
        vault = self._vault()
        nonce = args.get("nonce")
        if type(nonce) is not bytes or not 16 <= len(nonce) <= 64:
            raise Refused(Code.INVALID_ARGUMENT, "keys.list needs a 16-64 byte nonce")
        keys = await vault.authenticated_keys(time.monotonic() + vault.settings.unwrap_timeout_s, MAX_LIST_KEYS)
        receipt = self.identity.receipt("keys.list", nonce, {"keys": keys})
        return {"keys": [_public(k) for k in keys], "receipt": receipt}

    async def _op_credentials(self, args: dict[str, Any]) -> dict[str, Any]:
        vault = self._vault()
        ak, sk, token = args.get("access_key_id"), args.get("secret_access_key"), args.get("session_token")
        if not (_short_str(ak) and _short_str(sk) and (token is None or _short_str(token, 4096))):
            raise Refused(Code.INVALID_ARGUMENT, "kms.credentials needs access_key_id, secret_access_key (and optional "
                          "session_token) as strings")  # fmt: skip
        # credentials only sign requests: the KMS endpoint and key ARNs come from the measured configuration
        vault.kms.set_credentials(str(ak), str(sk), token)
        log.info("kms_credentials_updated", access_key_id=str(ak)[:4] + "...")
        return {"updated": True}


KeyOpHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class _Connection:
    """One host connection: frames out under a lock, credits enforced, and the tasks serving its
    slow requests and key operations."""

    def __init__(self, server: EnclaveServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.outstanding = 0  # sign requests received and not yet answered
        self.deferred_bytes = 0  # bytes of those waiting for a keyring unwrap
        self.key_ops = 0
        # what each frame from the host is for; any other frame is refused (unknown_frame)
        self._handlers: dict[type[frames.Frame], Callable[[Any], Awaitable[None]]] = {
            frames.SignFrame: self._on_sign,
            frames.PingFrame: self._on_ping,
            frames.KeyOpFrame: self._on_key_op,
        }

    async def send(self, frame: frames.Frame) -> None:
        data = frame.encode()
        async with self._lock:
            await frames.write_frame(self.writer, data)

    async def send_results(self, items: list[list[Any]]) -> None:
        self.outstanding -= len(items)
        # credits come back with the results: the host may send this many more
        await self.send(frames.ResultsFrame(items, len(items)))

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

    async def handle(self, frame: frames.Frame) -> None:
        handler = self._handlers.get(type(frame))
        if handler is None:
            raise frames.unexpected(frame)
        await handler(frame)

    async def _on_sign(self, frame: frames.SignFrame) -> None:
        items = frame.items  # [[int, bytes], ...] (checked when decoded)
        self.outstanding += len(items)
        if self.outstanding > self.server.credits:
            raise frames.FrameError(
                Code.CREDITS_EXCEEDED, f"{self.outstanding} requests outstanding, {self.server.credits} granted"
            )
        service = self.server.service
        ready, deferred = service.sign_batch(items)
        if ready:
            await self.send_results(ready)
        if deferred:
            held = sum(len(d.raw) for d in deferred)
            self.deferred_bytes += held
            if self.deferred_bytes > MAX_DEFERRED_BYTES:
                raise frames.FrameError(
                    Code.DEFERRED_BYTES_EXCEEDED, f"more than {MAX_DEFERRED_BYTES} request bytes waiting for keyrings"
                )
            self.spawn(self._finish_deferred(service, deferred, held))

    async def _on_ping(self, frame: frames.PingFrame) -> None:
        await self.send(frames.PongFrame(frame.id, self.server.stats()))

    async def _on_key_op(self, frame: frames.KeyOpFrame) -> None:
        if self.key_ops >= MAX_KEY_OPS_IN_FLIGHT:
            raise frames.FrameError(Code.TOO_MANY_KEY_OPS, f"more than {MAX_KEY_OPS_IN_FLIGHT} key operations at once")
        self.key_ops += 1
        self.spawn(self._key_op(frame))

    async def _finish_deferred(
        self, service: SigningService | NoopService, deferred: list[Deferred], held: int
    ) -> None:
        try:
            results = await service.sign_deferred(deferred)
        finally:
            self.deferred_bytes -= held
        await self.send_results(results)

    async def _key_op(self, frame: frames.KeyOpFrame) -> None:
        try:
            handler = self.server.key_ops.get(frame.op)
            if handler is None:
                raise Refused(Code.UNKNOWN_OP, f"unknown op {frame.op[:40]!r}")
            reply = frames.KeyOpResultFrame.success(frame.id, await handler(frame.args))
        except Refused as exc:
            reply = frames.KeyOpResultFrame.refusal(frame.id, exc)
        except Exception as exc:  # never a silent drop: every operation gets a typed reply
            log.warning("key_op_failed", op=frame.op[:40], error=type(exc).__name__)
            failed = Refused(Code.INTERNAL, f"enclave failed: {type(exc).__name__}")
            reply = frames.KeyOpResultFrame.refusal(frame.id, failed)
        finally:
            self.key_ops -= 1
        await self.send(reply)


def _name(args: dict[str, Any], field: str) -> str:
    value = args.get(field)
    if not valid_name(value):
        raise Refused(Code.INVALID_ARGUMENT, f"{field} must be {NAME_RULE}")
    return str(value)


def _scheme(args: dict[str, Any]) -> str:
    scheme = args.get("scheme")
    if scheme not in KEY_SCHEMES:
        raise Refused(Code.INVALID_ARGUMENT, f"unknown key scheme {str(scheme)[:20]!r}, expected one of {KEY_SCHEMES}")
    return str(scheme)


def _policy(args: dict[str, Any]) -> dict[str, Any] | None:
    policy = args.get("policy")
    if policy is not None and not policy_shape_ok(policy):
        raise Refused(Code.INVALID_POLICY, "a policy must be a small map (see the key policy documentation)")
    return policy


def _short_str(value: Any, max_len: int = 256) -> bool:
    return type(value) is str and 1 <= len(value) <= max_len


def _public(attested: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in attested.items() if k not in ("public_key", "policy_sha256")}
    out["public_key"] = attested["public_key"].hex()
    out["policy_sha256"] = attested["policy_sha256"].hex()
    return out
