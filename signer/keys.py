"""Key management on the host: relays operations to an enclave and keeps what it returns.

The host never sees a private key or a data key: it stores the wrapped keyrings
and sealed keys the enclave hands back, and loads them into the other enclaves
(signer/backend.py loads them into every new connection).
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

import msgpack
import structlog

from schemas.records import KeyringEnvelope, SealedKey
from schemas.refusals import Code, Refused

from .channel import ChannelClosed
from .keystore import KeyringConflict, KeyStore, KeyStoreError
from .pool import EnclavePool

log = structlog.get_logger("keys")

LOAD_CHUNK = 2000  # sealed keys per keyrings.load frame, at most
LOAD_CHUNK_BYTES = 1024 * 1024  # and at most this many encoded bytes (enclaves accept 2 MiB frames)
LIST_KEYS = 10_000  # keys one keys.list answer holds (an enclave lists its lowest key ids, this many)


def load_frames(envelopes: list[dict[str, Any]], keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """keyrings.load arguments in frames an enclave accepts: envelopes first, bounded in count and bytes."""
    out: list[dict[str, Any]] = []
    current: dict[str, list[dict[str, Any]]] = {"envelopes": [], "keys": []}
    size = 0
    for kind, records in (("envelopes", envelopes), ("keys", keys)):
        for record in records:
            n = len(msgpack.packb(record, use_bin_type=True))
            if current["envelopes"] or current["keys"]:
                full = size + n > LOAD_CHUNK_BYTES or len(current["keys"]) + len(current["envelopes"]) >= LOAD_CHUNK
                if full:
                    out.append(current)
                    current, size = {"envelopes": [], "keys": []}, 0
            current[kind].append(record)
            size += n
    if current["envelopes"] or current["keys"] or not out:
        out.append(current)
    return out


def newest(keys: list[SealedKey], n: int) -> list[SealedKey]:
    """The `n` most recently created keys (by their records' creation time), oldest first: what a new
    enclave connection is given (SIGNER_PRELOAD_KEYS); loaded in this order, an enclave whose key cache
    is smaller keeps the newest."""
    if n <= 0:
        return []
    if len(keys) > n:
        keys = heapq.nlargest(n, keys, key=lambda k: k.created_ms)
    return sorted(keys, key=lambda k: k.created_ms)


class KeyOpError(Refused):
    """A key operation refused, by this host or relayed from the enclave: the admin reply's error."""


class KeyManager:
    """Relays admin operations (signed by operators) to an enclave and keeps the records it returns."""

    def __init__(
        self, pool: EnclavePool, store: KeyStore, default_keyring: str = "default", preload_keys: int = 10_000
    ):
        self.pool = pool
        self.store = store
        self.default_keyring = default_keyring
        self.preload_keys = preload_keys  # keys a new enclave connection is given (EnclaveBackend.load_into)
        self._locks: dict[str, asyncio.Lock] = {}

    async def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Relay one admin operation to an enclave and store what it returns; raise KeyOpError.

        The host cannot author these: create, import and rotate carry operator signatures the
        enclave checks, and the enclave's replies carry receipts the operator's CLI checks. The
        host routes (by enclave_id, which the operator got from `enclave.identity`), makes sure
        the enclave has the keyring, and keeps the wrapped records."""
        try:
            if op == "enclave.identity":
                keyring = str(args.get("keyring") or self.default_keyring)
                enclave_id = args.get("enclave_id")
                reply = await self.pool.key_op(
                    "enclave.identity",
                    {},
                    route_key=keyring,
                    enclave_id=enclave_id if type(enclave_id) is str else None,
                )
                return self._result(reply)
            if op == "keys.list":
                return await self._list(args)
            if op in ("keys.create", "keys.import"):
                return await self._add(op, args)
            if op == "keys.rotate_dek":
                return await self._rotate(args)
        except ChannelClosed as exc:
            raise KeyOpError(Code.ENCLAVE_UNAVAILABLE, str(exc)) from None
        except KeyStoreError as exc:  # the catalogue has no code of its own for this yet
            raise KeyOpError(Code.INTERNAL, f"the key store could not be read or written ({exc}); retry") from None
        except KeyOpError:
            raise
        except (ValueError, KeyError, TypeError) as exc:  # a malformed enclave reply: an error reply, not a stop
            what = f"the enclave's reply to {op} is malformed ({type(exc).__name__})"
            raise KeyOpError(Code.INTERNAL, what) from None
        raise KeyOpError(Code.UNKNOWN_OP, f"unknown op {op!r}")

    @staticmethod
    def _target(args: dict[str, Any]) -> str:
        enclave_id = args.get("enclave_id")
        if type(enclave_id) is not str:
            raise KeyOpError(Code.INVALID_ARGUMENT, "enclave_id (from enclave.identity) is required")
        return enclave_id

    @staticmethod
    def _signed(args: dict[str, Any]) -> dict[str, Any]:
        """What the enclave needs of a signed operation (the host adds nothing to it)."""
        out = {"operation": args.get("operation"), "approvals": args.get("approvals")}
        if "encrypted_key" in args:
            out["encrypted_key"] = args["encrypted_key"]
        return out

    @staticmethod
    def _result(reply: dict[str, Any]) -> dict[str, Any]:
        if not reply.get("ok"):
            raise KeyOpError.from_wire(reply.get("error"))
        return {**dict(reply["result"]), "enclave_id": reply.get("enclave_id")}

    async def _list(self, args: dict[str, Any]) -> dict[str, Any]:
        """An enclave holds the keys it was given when it connected (`preload_keys`, the newest), created
        through this host, or asked for (and within its bounded cache): first give it those of the keys its
        answer will hold - the store's LIST_KEYS lowest key ids, the order it lists in - that it was not
        given when it connected, so the listing is the store's, as far as the enclave can open it."""
        enclave_id = self._target(args)
        keys = self.store.keys()
        given = {k.key_id for k in newest(keys, self.preload_keys)}
        listed = [k for k in heapq.nsmallest(LIST_KEYS, keys, key=lambda k: k.key_id) if k.key_id not in given]
        if listed:
            rings = {k.keyring_id for k in listed}
            envelopes = [e.to_wire() for e in self.store.envelopes() if e.keyring_id in rings]
            for load in load_frames(envelopes, [k.to_wire() for k in listed]):
                await self.pool.key_op("keyrings.load", load, enclave_id=enclave_id)
        reply = await self.pool.key_op("keys.list", {"nonce": args.get("nonce")}, enclave_id=enclave_id)
        return self._result(reply)

    async def _add(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        enclave_id = self._target(args)
        keyring = str(args.get("keyring") or self.default_keyring)  # routing only: the signed copy rules
        async with self._locks.setdefault(keyring, asyncio.Lock()):
            await self.store.refresh()  # another host may have created the keyring meanwhile
            env = self.store.get_envelope(keyring)
            if env is not None:  # make sure the chosen enclave has the current keyring
                await self.pool.key_op("keyrings.load", {"envelopes": [env.to_wire()], "keys": []},
                                       enclave_id=enclave_id)  # fmt: skip
            reply = await self.pool.key_op(op, self._signed(args), enclave_id=enclave_id)
            result = self._result(reply)
            new_env = KeyringEnvelope.from_wire(result["envelope"]) if result.get("envelope") else None
            sealed = SealedKey.from_wire(result["sealed"])
            if new_env is not None:
                try:
                    await self.store.put_envelope(new_env)
                except KeyringConflict as exc:
                    raise KeyOpError(Code.KEYRING_CONFLICT, f"{exc}; retry") from None
            sealed_under = new_env or await self._envelope_of(sealed)
            await self.store.put_keys(sealed_under, [sealed])
            await self.pool.broadcast(
                "keyrings.load",
                {"envelopes": [new_env.to_wire()] if new_env else [], "keys": [sealed.to_wire()]},
                exclude_url=reply.get("url"),
            )
            log.info("key_stored", key_id=sealed.key_id, keyring=sealed.keyring_id, op=op)
            return {**result["key"], "receipt": result["receipt"], "enclave_id": result["enclave_id"]}

    async def _envelope_of(self, sealed: SealedKey) -> KeyringEnvelope:
        """The stored envelope a new key was sealed under: its keyring's version as the enclave used it."""
        env = self.store.envelope_version(sealed.keyring_id, sealed.dek_version)
        if env is None:  # the enclave knew a version this host had not read yet
            await self.store.refresh()
            env = self.store.envelope_version(sealed.keyring_id, sealed.dek_version)
        if env is None:
            raise KeyOpError(Code.KEYRING_CONFLICT, f"keyring {sealed.keyring_id} version {sealed.dek_version} "
                             "is not in the key store; retry")  # fmt: skip
        return env

    async def _rotate(self, args: dict[str, Any]) -> dict[str, Any]:
        enclave_id = self._target(args)
        keyring = str(args.get("keyring") or self.default_keyring)
        async with self._locks.setdefault(keyring, asyncio.Lock()):
            await self.store.refresh()
            env = self.store.get_envelope(keyring)
            if env is None:
                raise KeyOpError(Code.UNKNOWN_KEYRING, f"no keyring {keyring!r}")
            members = [k.to_wire() for k in self.store.keys() if k.keyring_id == keyring]
            for load in load_frames([env.to_wire()], members):
                await self.pool.key_op("keyrings.load", load, enclave_id=enclave_id)
            # the enclave refuses to rotate unless it holds every one of them (its key store is bounded)
            signed = {**self._signed(args), "keys_expected": len(members)}
            reply = await self.pool.key_op("keys.rotate_dek", signed, enclave_id=enclave_id)
            result = self._result(reply)
            new_env = KeyringEnvelope.from_wire(result["envelope"])
            resealed = [SealedKey.from_wire(m) for m in result["sealed"]]
            try:  # keys first: the new version is current only once its envelope exists
                await self.store.put_keys(new_env, resealed)
                await self.store.put_envelope(new_env)
            except KeyringConflict as exc:
                raise KeyOpError(Code.KEYRING_CONFLICT, f"{exc}; retry") from None
            for load in load_frames([new_env.to_wire()], [s.to_wire() for s in resealed]):
                await self.pool.broadcast("keyrings.load", load, exclude_url=reply.get("url"))
            log.info("dek_rotated", keyring=keyring, version=new_env.dek_version, keys=len(resealed))
            return {"keyring": keyring, "dek_version": new_env.dek_version, "keys": len(resealed),
                    "receipt": result["receipt"], "enclave_id": result["enclave_id"]}  # fmt: skip
