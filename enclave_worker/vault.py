"""The enclave's key vault: wrapped keyrings in, wallets out, with attested, batched KMS unwraps.

- One KMS Decrypt opens a whole keyring (all its wallet keys): "batched unwraps".
- Concurrent requests needing the same data key share one KMS call (single-flight);
  distinct data keys are unwrapped with bounded concurrency.
- Unwrapped data keys live in a bounded, TTL'd DataKeyCache, with at most
  ``max_open_keys`` opened wallet keys.
- The sealed records the host pushes are held in a bounded LRU (`SealedKeys`, at
  most ``max_keys`` records and ``max_key_bytes`` bytes): the host's store may be
  far larger than what one enclave holds. A request for a record dropped here is
  answered ``unknown_key``, and the host pushes the record again.
- Every Decrypt/GenerateDataKey carries a Recipient: an attestation document
  with this process's RSA-2048 public key (generated once, reused), so KMS
  answers only with CMS EnvelopedData that this process alone can open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from bisect import bisect_left
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from schemas.operations import identity_user_data, import_label, policy_digest
from schemas.refusals import Code, Refused

from .attestation import AttestationProvider
from .cms import CmsError, open_enveloped_data
from .datakeys import CachedDataKey, DataKeyCache
from .keyring import KeyringEnvelope, SealedKey, seal, unseal
from .kms import KmsClient, KmsError
from .policy import KeyPolicy, PolicyError, parse_policy
from .trust import EnclaveConfig
from .wallets import Wallet, new_secret, wallet_from_secret

log = structlog.get_logger("vault")

UNWRAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class VaultSettings:
    max_concurrent_unwraps: int = 4
    unwrap_timeout_s: float = 30.0
    cache_entries: int = 1024
    cache_ttl_s: float = 3600.0
    cache_max_uses: int = 10_000_000
    max_keys: int = 100_000  # sealed records held (least recently used dropped past it)
    max_key_bytes: int = 64 * 1024 * 1024  # their bytes, as SealedKeys.size counts them
    max_open_keys: int = 20_000  # opened wallet keys kept, across all data keys


NODE_BYTES = 128  # what SealedKeys.size charges per value in a policy (a small Python object and its slot)


def _nodes(policy: Any) -> int:
    """Values in a policy (maps, lists, keys and scalars); a policy is shallow and at most 64 KiB encoded."""
    if policy is None:
        return 0
    count, stack = 0, [policy]
    while stack:
        obj = stack.pop()
        count += 1
        if type(obj) is dict:
            count += len(obj)  # the keys
            stack.extend(obj.values())
        elif type(obj) is list:
            stack.extend(obj)
    return count


class SealedKeys:
    """The sealed key records the host has pushed, by key id, least recently used first, bounded by
    count and bytes: past either bound the least recently used records are dropped (``on_drop`` is
    told, so their opened wallets go too). Nothing here is believed until it opens."""

    def __init__(self, max_keys: int, max_bytes: int, on_drop: Callable[[SealedKey], None]) -> None:
        self.max_keys, self.max_bytes = max_keys, max_bytes
        self._on_drop = on_drop
        self._records: OrderedDict[str, SealedKey] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0
        self.evictions = 0

    @staticmethod
    def size(key: SealedKey) -> int:
        """What a record costs here: its fields, its associated data (computed now, once, and kept),
        a fixed overhead per record, and NODE_BYTES per value in its policy (a decoded empty list
        costs a Python object, whatever its one encoded byte)."""
        return (256 + len(key.key_id) + len(key.keyring_id) + len(key.scheme) + len(key.public_key)
                + len(key.address or "") + len(key.nonce) + len(key.ciphertext) + len(key.aad())
                + NODE_BYTES * _nodes(key.policy))  # fmt: skip

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._records))

    def values(self) -> list[SealedKey]:
        return list(self._records.values())

    def get(self, key_id: str) -> SealedKey | None:
        """The record, marked as just used."""
        key = self._records.get(key_id)
        if key is not None:
            self._records.move_to_end(key_id)
        return key

    def peek(self, key_id: str) -> SealedKey | None:
        return self._records.get(key_id)

    def put(self, key: SealedKey) -> None:
        size = self.size(key)
        old = self._sizes.pop(key.key_id, None)
        if old is not None:
            self.bytes -= old
            del self._records[key.key_id]
        self._records[key.key_id] = key
        self._sizes[key.key_id] = size
        self.bytes += size
        while len(self._records) > 1 and (len(self._records) > self.max_keys or self.bytes > self.max_bytes):
            key_id, dropped = self._records.popitem(last=False)
            self.bytes -= self._sizes.pop(key_id)
            self.evictions += 1
            self._on_drop(dropped)


@dataclass(frozen=True, slots=True)
class OpenedKey:
    """A wallet key whose sealed record was just authenticated (AEAD-verified) by this enclave.

    Policy and authentication are evaluated on this object only, and its wallet is the one
    that signs: the host's copy of the record may change at any time, this cannot."""

    record: SealedKey
    wallet: Wallet
    policy: KeyPolicy | None


class Vault:
    def __init__(
        self,
        kms: KmsClient,
        attestation: AttestationProvider,
        config: EnclaveConfig,
        settings: VaultSettings | None = None,
    ) -> None:
        self.kms = kms
        self.attestation = attestation
        self.config = config
        self.settings = settings or VaultSettings()
        # RSA-2048 costs ~60 ms to generate: once per process, reused. Two keys, never mixed:
        # KMS answers (CiphertextForRecipient) are encrypted to one, operators' key imports to
        # the other, so nothing KMS returns can be passed off as an import.
        self._recipient_rsa = rsa.generate_private_key(65537, 2048)
        self._recipient_spki = _spki(self._recipient_rsa)
        self._import_rsa = rsa.generate_private_key(65537, 2048)
        self.import_spki = _spki(self._import_rsa)
        s = self.settings
        self.cache = DataKeyCache(s.cache_entries, s.cache_ttl_s, s.cache_max_uses, max_opened=s.max_open_keys)
        self.envelopes: dict[tuple[str, int], KeyringEnvelope] = {}
        self.current: dict[str, int] = {}  # keyring_id -> current DEK version
        # as the host supplied them: untrusted until opened; bounded, least recently used dropped first
        self.sealed = SealedKeys(s.max_keys, s.max_key_bytes, self._dropped)
        # records that did not open, with why: asked again, the same record object is refused at once
        self._unopenable: dict[str, tuple[SealedKey, Refused]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Task[CachedDataKey]] = {}
        self._sem: asyncio.Semaphore | None = None
        self._keyring_locks: dict[str, asyncio.Lock] = {}
        self.stats: Counter[str] = Counter()
        self.unwrap_bounds = list(UNWRAP_BUCKETS)
        self.unwrap_counts = [0] * (len(UNWRAP_BUCKETS) + 1)
        self.unwrap_seconds = 0.0

    # -- loading what the host stores -------------------------------------------------------------

    def _dropped(self, key: SealedKey) -> None:
        """A record the bounded store let go: nothing opened from it, or known about it, is kept."""
        self.cache.forget_wallet(key.key_id)
        self._unopenable.pop(key.key_id, None)

    def load(self, envelopes: list[KeyringEnvelope], keys: list[SealedKey]) -> None:
        """Take the host's records. Nothing in them is believed until a record opens: an
        envelope under a KMS key outside the configuration is kept out altogether."""
        for env in envelopes:
            if not self.config.allows_kms_key(env.kms_key_id):
                raise Refused(Code.KMS_KEY_NOT_ALLOWED, f"keyring {env.keyring_id}: its KMS key is not in this "
                              "enclave's configuration")  # fmt: skip
        for env in envelopes:
            slot = (env.keyring_id, env.dek_version)
            held = self.envelopes.get(slot)
            if held is not None and held != env:
                # another envelope for this version (a creation race another host won, or a host's
                # swap): nothing unwrapped, opened or refused under the one it replaces stands
                self.cache.drop(*slot)
                self._unopenable.clear()
            self.envelopes[slot] = env
            if env.dek_version >= self.current.get(env.keyring_id, 0):
                self.current[env.keyring_id] = env.dek_version
        for key in keys:
            have = self.sealed.peek(key.key_id)
            if have is None or key.dek_version >= have.dek_version:
                if have is not None and have != key:
                    # a different record for the same key: nothing opened from the old one may be used
                    self.cache.forget_wallet(key.key_id)
                    self._unopenable.pop(key.key_id, None)
                self.sealed.put(key)

    # -- the signing path -------------------------------------------------------------------------------

    def hot_key(self, key_id: str) -> OpenedKey | None:
        """The key, authenticated from its current record, if its data key is cached (no await)."""
        sealed = self.sealed.get(key_id)
        if sealed is None:
            return None
        entry = self.cache.get(sealed.keyring_id, sealed.dek_version)
        if entry is None:
            return None
        entry.uses += 1
        opened = self.cache.opened(entry, key_id)
        if opened is not None and opened.record is sealed:
            return cast(OpenedKey, opened)
        return self._open(entry, sealed)

    async def open_key(self, key_id: str, deadline: float) -> OpenedKey:
        """The key, unwrapping its keyring's data key through KMS if needed, then authenticated
        from the record that is current *after* the unwrap (the host may have replaced it)."""
        for _ in range(3):
            sealed = self.sealed.get(key_id)
            if sealed is None:
                raise Refused(Code.UNKNOWN_KEY, "no such key in this enclave's keyrings")
            await self.data_key(sealed.keyring_id, sealed.dek_version, deadline)
            opened = self.hot_key(key_id)
            if opened is not None:
                return opened
        raise Refused(Code.KEY_UNSTABLE, "the key's record kept changing while its keyring was unwrapped")

    def _open(self, entry: CachedDataKey, sealed: SealedKey) -> OpenedKey:
        failed = self._unopenable.get(sealed.key_id)
        if failed is not None and failed[0] is sealed:  # this very record did not open before
            raise Refused(failed[1].code, failed[1].message)
        try:
            opened = self._open_record(entry, sealed)
        except Refused as exc:
            if self.sealed.peek(sealed.key_id) is sealed:  # remembered only while the record is held
                self._unopenable[sealed.key_id] = (sealed, exc)
            raise
        self.cache.keep_opened(entry, sealed.key_id, opened)
        return opened

    def _open_record(self, entry: CachedDataKey, sealed: SealedKey) -> OpenedKey:
        try:
            secret = bytearray(unseal(entry.aead, sealed))
        except InvalidTag:
            raise Refused(Code.SEALED_KEY_INVALID, "the sealed key does not open with its keyring's data key") from None
        try:
            wallet = wallet_from_secret(sealed.key_id, sealed.scheme, bytes(secret))
        except ValueError:
            raise Refused(Code.SEALED_KEY_INVALID, "the sealed key does not hold a valid private key") from None
        finally:
            secret[:] = bytes(len(secret))
        # the address is not part of the sealed record's associated data: it must be the wallet's own
        if wallet.public_key != sealed.public_key or wallet.address != sealed.address:
            raise Refused(Code.SEALED_KEY_INVALID, "the record's public key or address is not the key's")
        try:
            policy = parse_policy(sealed.policy)
        except (PolicyError, TypeError, ValueError) as exc:  # e.g. sealed under looser rules: fail closed
            detail = exc.message if isinstance(exc, PolicyError) else str(exc)
            raise Refused(Code.INVALID_POLICY, f"the key's sealed policy is not accepted: {detail}") from None
        return OpenedKey(sealed, wallet, policy)

    async def data_key(self, keyring_id: str, version: int, deadline: float) -> CachedDataKey:
        entry = self.cache.get(keyring_id, version)
        if entry is not None:
            return entry
        slot = (keyring_id, version)
        task = self._inflight.get(slot)
        if task is None:  # single flight: the first asker starts the unwrap, later ones join it
            task = asyncio.create_task(self._unwrap(slot), name=f"unwrap {keyring_id} v{version}")
            task.add_done_callback(self._unwrap_done)
            self._inflight[slot] = task
        else:
            self.stats["unwrap_joined"] += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refused(Code.DEADLINE_PASSED, "deadline passed while waiting for the keyring")
        try:
            async with asyncio.timeout(remaining):
                return await asyncio.shield(task)
        except TimeoutError:
            raise Refused(Code.DEADLINE_PASSED, "deadline passed while the keyring was unwrapped") from None

    def _unwrap_done(self, task: asyncio.Task[CachedDataKey]) -> None:
        for slot, t in list(self._inflight.items()):
            if t is task:
                del self._inflight[slot]
        if not task.cancelled() and task.exception() is not None:
            log.warning("unwrap_failed", error=str(task.exception()))

    async def _unwrap(self, slot: tuple[str, int]) -> CachedDataKey:
        env = self.envelopes.get(slot)
        if env is None:
            raise Refused(Code.UNKNOWN_KEYRING, f"keyring {slot[0]} v{slot[1]} is not loaded")
        if not self.config.allows_kms_key(env.kms_key_id):  # load() keeps them out; checked again here
            raise Refused(Code.KMS_KEY_NOT_ALLOWED, "the keyring's KMS key is not in this enclave's configuration")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.settings.max_concurrent_unwraps)
        async with self._sem:
            t0 = time.monotonic()
            try:
                _, cms, answered_by = await self.kms.decrypt(
                    env.encrypted_dek, env.kms_context(), self.recipient(), key_id=env.kms_key_id,
                    deadline=t0 + self.settings.unwrap_timeout_s,
                )  # fmt: skip
            except KmsError as exc:
                raise _kms_failure(exc) from None
            finally:
                self.stats["kms_decrypt"] += 1
            self._check_answered_by(answered_by, env.kms_key_id)
            dek = self._open_cms(cms)
            entry = self.cache.put(env.keyring_id, env.dek_version, dek)
            elapsed = time.monotonic() - t0
            self.stats["unwraps"] += 1
            self.unwrap_seconds += elapsed
            self.unwrap_counts[bisect_left(self.unwrap_bounds, elapsed)] += 1
            opened = sum(1 for k in self.sealed.values() if (k.keyring_id, k.dek_version) == slot)
            self.stats["unwrap_keys"] += opened
            log.info("keyring_unwrapped", keyring=env.keyring_id, version=env.dek_version,
                     seconds=round(elapsed, 4), keys=opened)  # fmt: skip
            return entry

    @staticmethod
    def _check_answered_by(answered_by: str | None, wanted: str) -> None:
        if answered_by != wanted:
            raise Refused(Code.KMS_PROTOCOL, f"KMS answered for key {str(answered_by)[:120]!r}, not the one asked for")

    def _open_cms(self, cms: bytes | None) -> bytes:
        if cms is None:
            raise Refused(Code.KMS_PROTOCOL, "KMS returned no CiphertextForRecipient")
        try:
            dek = open_enveloped_data(cms, self._recipient_rsa)
        except CmsError as exc:
            raise Refused(Code.KMS_PROTOCOL, f"CiphertextForRecipient does not open: {exc}") from None
        if len(dek) != 32:
            raise Refused(Code.KMS_PROTOCOL, "the data key is not 32 bytes")
        return dek

    def recipient(self) -> dict[str, str]:
        """A fresh attestation document over the (reused) KMS recipient RSA key."""
        doc = self.attestation.document(public_key=self._recipient_spki)
        return {"AttestationDocument": base64.b64encode(doc).decode(), "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}

    # -- key management (operator-approved operations only: see operations.py) ---------------------

    def _lock(self, keyring_id: str) -> asyncio.Lock:
        return self._keyring_locks.setdefault(keyring_id, asyncio.Lock())

    async def _new_data_key(self, keyring_id: str, version: int) -> tuple[KeyringEnvelope, bytes]:
        """A new data key from KMS under the configured keyring KMS key; nothing is stored yet."""
        arn = self.config.new_keyring_key
        draft = KeyringEnvelope(keyring_id, arn, version, b"", int(time.time() * 1000))
        try:
            dk = await self.kms.generate_data_key(
                arn, draft.kms_context(), self.recipient(), deadline=time.monotonic() + self.settings.unwrap_timeout_s
            )
        except KmsError as exc:
            raise _kms_failure(exc) from None
        finally:
            self.stats["kms_generate_data_key"] += 1
        self._check_answered_by(dk.key_id, arn)
        dek = self._open_cms(dk.ciphertext_for_recipient)
        return KeyringEnvelope(keyring_id, arn, version, dk.ciphertext_blob, draft.created_ms), dek

    async def _add_key(
        self, keyring_id: str, scheme: str, secret: bytearray, policy: dict[str, Any] | None
    ) -> dict[str, Any]:
        try:
            parse_policy(policy)  # a PolicyError is the refusal (invalid_policy)
            async with self._lock(keyring_id):
                new_env = None
                version = self.current.get(keyring_id)
                if version is None:
                    new_env, dek = await self._new_data_key(keyring_id, 1)
                    entry = self.cache.put(keyring_id, 1, dek)
                    self.load([new_env], [])
                    env = new_env
                else:
                    # the envelope of the data key actually used, captured before any await: the host
                    # may load other versions meanwhile
                    env = self.envelopes[(keyring_id, version)]
                    entry = await self.data_key(keyring_id, version, time.monotonic() + self.settings.unwrap_timeout_s)
                key_id = "k_" + secrets.token_hex(10)
                wallet = wallet_from_secret(key_id, scheme, bytes(secret))
                sealed = seal(entry.aead, key_id, env, scheme, wallet.public_key, wallet.address, bytes(secret),
                              int(time.time() * 1000), policy)  # fmt: skip
                unseal(entry.aead, sealed)  # it opens, or no receipt is given for it
        finally:
            secret[:] = bytes(len(secret))
        self.sealed.put(sealed)
        self.cache.keep_opened(entry, key_id, OpenedKey(sealed, wallet, parse_policy(policy)))
        envelope = new_env.to_wire() if new_env else None
        return {"key": sealed.describe(), "sealed": sealed.to_wire(), "envelope": envelope,
                "attested": self.attested(sealed, env)}  # fmt: skip

    def attested(self, sealed: SealedKey, env: KeyringEnvelope) -> dict[str, Any]:
        """What a receipt vouches for about a key."""
        return {"key_id": sealed.key_id, "scheme": sealed.scheme, "public_key": sealed.public_key,
                "address": sealed.address, "keyring": sealed.keyring_id, "dek_version": sealed.dek_version,
                "kms_key_arn": env.kms_key_id, "policy_sha256": policy_digest(sealed.policy)}  # fmt: skip

    async def create_key(self, keyring_id: str, scheme: str, policy: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._add_key(keyring_id, scheme, bytearray(new_secret(scheme)), policy)

    def identity_document(self, identity_public_key: bytes) -> bytes:
        """An attestation document carrying the import RSA key (public_key) and this process's
        identity key and configuration hash (user_data): what operators verify before acting."""
        return self.attestation.document(
            public_key=self.import_spki, user_data=identity_user_data(identity_public_key, self.config.digest)
        )

    async def import_key(
        self, keyring_id: str, scheme: str, encrypted_key: bytes, policy: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        label = import_label(keyring_id, scheme, policy)
        oaep = OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=label)
        try:
            secret = bytearray(self._import_rsa.decrypt(encrypted_key, oaep))
        except ValueError:
            raise Refused(Code.IMPORT_UNDECRYPTABLE, "the key is not encrypted to this enclave's import key for this "
                          "keyring, scheme and policy") from None  # fmt: skip
        if len(secret) != 32:
            secret[:] = bytes(len(secret))
            raise Refused(Code.INVALID_ARGUMENT, "an imported private key is 32 bytes")
        try:
            wallet_from_secret("import", scheme, bytes(secret))
        except ValueError:
            secret[:] = bytes(len(secret))
            raise Refused(Code.INVALID_ARGUMENT, f"not a valid {scheme} private key") from None
        return await self._add_key(keyring_id, scheme, secret, policy)

    async def rotate_dek(self, keyring_id: str, expected_keys: int | None = None) -> dict[str, Any]:
        """A new data key version for the keyring, with every key of the keyring sealed again under
        it. Atomic: the new version becomes current only once every key is resealed. With
        `expected_keys` (how many keys the host's store holds for the keyring), a rotation that would
        reseal fewer - the bounded key store let some go, the keyring is larger than it holds - is
        refused before anything changes, rather than leave keys behind on the old data key."""
        async with self._lock(keyring_id):
            version = self.current.get(keyring_id)
            if version is None:
                raise Refused(Code.UNKNOWN_KEYRING, f"no keyring {keyring_id!r}")
            old_entry = await self.data_key(keyring_id, version, time.monotonic() + self.settings.unwrap_timeout_s)
            members = [k for k in self.sealed.values() if k.keyring_id == keyring_id and k.dek_version == version]
            if expected_keys is not None and len(members) != expected_keys:
                held = f"keyring {keyring_id}: {len(members)} of its {expected_keys} keys are held here"
                raise Refused(Code.TOO_MANY_KEYS, f"{held} (ENCLAVE_MAX_KEYS / _BYTES); nothing was rotated")
            opened = [self._open(old_entry, k) for k in members]  # every record authenticated first
            new_env, dek = await self._new_data_key(keyring_id, version + 1)
            aead = AESGCM(dek)
            resealed = []
            for key in opened:
                sealed = key.record
                secret = bytearray(unseal(old_entry.aead, sealed))
                try:
                    resealed.append(seal(aead, sealed.key_id, new_env, sealed.scheme, sealed.public_key,
                                         sealed.address, bytes(secret), sealed.created_ms, sealed.policy))  # fmt: skip
                finally:
                    secret[:] = bytes(len(secret))
            entry = self.cache.put(keyring_id, version + 1, dek)  # commit: nothing below can fail
            self.load([new_env], resealed)
            for again, key in zip(resealed, opened, strict=True):
                self.cache.keep_opened(entry, again.key_id, OpenedKey(again, key.wallet, key.policy))
            self.cache.drop(keyring_id, version)  # the old data key is no longer needed here
            return {"envelope": new_env.to_wire(), "sealed": [s.to_wire() for s in resealed],
                    "attested": {"keyring": keyring_id, "dek_version": version + 1, "kms_key_arn": new_env.kms_key_id,
                                 "keys": sorted(s.key_id for s in resealed)}}  # fmt: skip

    async def authenticated_keys(self, deadline: float, limit: int) -> list[dict[str, Any]]:
        """Every loaded key whose record opens (unwrapping keyrings as needed), as receipts vouch
        for them; records that do not open are left out."""
        out = []
        for key_id in sorted(self.sealed)[:limit]:
            try:
                key = await self.open_key(key_id, deadline)
                env = self.envelopes[(key.record.keyring_id, key.record.dek_version)]
            except Exception:  # a record that does not open is not vouched for, whatever the reason
                continue
            out.append(self.attested(key.record, env))
        return out

    def stats_snapshot(self) -> dict[str, Any]:
        """The vault's counters, for the host to export (the enclave has no network of its own)."""
        counters = ("kms_decrypt", "kms_generate_data_key", "unwraps", "unwrap_joined", "unwrap_keys")
        return {
            **{k: int(self.stats.get(k, 0)) for k in counters},
            "kms_calls": self.kms.calls,
            "kms_throttles": self.kms.throttles,
            "unwrap_hist": {
                "bounds": self.unwrap_bounds,
                "counts": list(self.unwrap_counts),
                "sum": self.unwrap_seconds,
            },
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
            "cache_evictions": self.cache.evictions,
            "cache_entries": len(self.cache),
            "keys_loaded": len(self.sealed),
            "key_bytes": self.sealed.bytes,
            "keys_evicted": self.sealed.evictions,
            "keys_opened": self.cache.opened_count,
            "opened_evicted": self.cache.opened_evictions,
        }

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.cache.clear()
        await self.kms.close()


def _spki(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _kms_failure(exc: KmsError) -> Refused:
    if exc.code == "AccessDeniedException":
        return Refused(Code.KMS_ACCESS_DENIED, "KMS refused the data key to this enclave image")
    if exc.code == "ThrottlingException":
        return Refused(Code.KMS_THROTTLED, "KMS kept throttling until the deadline")
    if exc.code == "TransportError":
        return Refused(Code.KMS_UNAVAILABLE, exc.message)
    return Refused(Code.KMS_ERROR, f"{exc.code}: {exc.message}"[:200])
