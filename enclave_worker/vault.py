"""The enclave's key vault: wrapped keyrings in, wallets out, with attested, batched KMS unwraps.

- One KMS Decrypt opens a whole keyring (all its wallet keys): "batched unwraps".
- Concurrent requests needing the same data key share one KMS call (single-flight);
  distinct data keys are unwrapped with bounded concurrency.
- Unwrapped data keys live in a bounded, TTL'd DataKeyCache.
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
from collections import Counter
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .attestation import AttestationProvider
from .cms import OAEP_SHA256, CmsError, open_enveloped_data
from .datakeys import CachedDataKey, DataKeyCache
from .keyring import KeyringEnvelope, SealedKey, seal, unseal
from .kms import KmsClient, KmsError
from .policy import KeyPolicy, PolicyError, parse_policy
from .wallets import Wallet, new_secret, wallet_from_secret

log = structlog.get_logger("vault")

UNWRAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class VaultError(Exception):
    """A key that cannot be used now; ``code`` becomes the result's error code."""

    def __init__(self, code: str, message: str, status: str = "error") -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True)
class VaultSettings:
    max_concurrent_unwraps: int = 4
    unwrap_timeout_s: float = 30.0
    cache_entries: int = 1024
    cache_ttl_s: float = 3600.0
    cache_max_uses: int = 10_000_000


class Vault:
    def __init__(self, kms: KmsClient, attestation: AttestationProvider, settings: VaultSettings | None = None):
        self.kms = kms
        self.attestation = attestation
        self.settings = settings or VaultSettings()
        # RSA-2048 costs ~60 ms to generate: once per process, reused for every KMS call
        self._rsa = rsa.generate_private_key(65537, 2048)
        self._spki = self._rsa.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        s = self.settings
        self.cache = DataKeyCache(s.cache_entries, s.cache_ttl_s, s.cache_max_uses)
        self.envelopes: dict[tuple[str, int], KeyringEnvelope] = {}
        self.current: dict[str, int] = {}  # keyring_id -> current DEK version
        self.sealed: dict[str, SealedKey] = {}
        self._inflight: dict[tuple[str, int], asyncio.Task[CachedDataKey]] = {}
        self._sem: asyncio.Semaphore | None = None
        self._keyring_locks: dict[str, asyncio.Lock] = {}
        self.stats: Counter[str] = Counter()
        self.unwrap_bounds = list(UNWRAP_BUCKETS)
        self.unwrap_counts = [0] * (len(UNWRAP_BUCKETS) + 1)
        self._policies: dict[str, tuple[SealedKey, KeyPolicy | None]] = {}
        self.unwrap_seconds = 0.0

    # -- loading what the host stores -------------------------------------------------------------

    def load(self, envelopes: list[KeyringEnvelope], keys: list[SealedKey]) -> None:
        for env in envelopes:
            self.envelopes[(env.keyring_id, env.dek_version)] = env
            if env.dek_version >= self.current.get(env.keyring_id, 0):
                self.current[env.keyring_id] = env.dek_version
        for key in keys:
            have = self.sealed.get(key.key_id)
            if have is None or key.dek_version >= have.dek_version:
                if have is not None and have != key:
                    # a different record for the same key: nothing opened from the old one may be used
                    self.cache.forget_wallet(key.key_id)
                self.sealed[key.key_id] = key

    # -- the signing path -------------------------------------------------------------------------------

    def policy(self, key_id: str) -> KeyPolicy | None:
        """The key's parsed policy (sealed with it: it only counts once the key opens)."""
        sealed = self.sealed.get(key_id)
        if sealed is None or sealed.policy is None:
            return None
        cached = self._policies.get(key_id)
        if cached is None or cached[0] is not sealed:
            cached = self._policies[key_id] = (sealed, parse_policy(sealed.policy))
        return cached[1]

    def hot_wallet(self, key_id: str) -> Wallet | None:
        """The wallet if its data key is cached (no await): the fast path."""
        sealed = self.sealed.get(key_id)
        if sealed is None:
            return None
        entry = self.cache.get(sealed.keyring_id, sealed.dek_version)
        if entry is None:
            return None
        entry.uses += 1
        return entry.wallets.get(key_id) or self._open(entry, sealed)

    async def wallet(self, key_id: str, deadline: float) -> Wallet:
        """The wallet, unwrapping its keyring's data key through KMS if needed."""
        sealed = self.sealed.get(key_id)
        if sealed is None:
            raise VaultError("unknown_key", "no such key in this enclave's keyrings")
        entry = await self.data_key(sealed.keyring_id, sealed.dek_version, deadline)
        entry.uses += 1
        return entry.wallets.get(key_id) or self._open(entry, sealed)

    def _open(self, entry: CachedDataKey, sealed: SealedKey) -> Wallet:
        try:
            secret = bytearray(unseal(entry.aead, sealed))
        except InvalidTag:
            raise VaultError("sealed_key_invalid", "the sealed key does not open with its keyring's data key") from None
        try:
            wallet = wallet_from_secret(sealed.key_id, sealed.scheme, bytes(secret))
        finally:
            secret[:] = bytes(len(secret))
        entry.wallets[sealed.key_id] = wallet
        return wallet

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
            raise VaultError("deadline_passed", "deadline passed while waiting for the keyring", status="expired")
        try:
            async with asyncio.timeout(remaining):
                return await asyncio.shield(task)
        except TimeoutError:
            raise VaultError("deadline_passed", "deadline passed while the keyring was unwrapped", "expired") from None

    def _unwrap_done(self, task: asyncio.Task[CachedDataKey]) -> None:
        for slot, t in list(self._inflight.items()):
            if t is task:
                del self._inflight[slot]
        if not task.cancelled() and task.exception() is not None:
            log.warning("unwrap_failed", error=str(task.exception()))

    async def _unwrap(self, slot: tuple[str, int]) -> CachedDataKey:
        env = self.envelopes.get(slot)
        if env is None:
            raise VaultError("unknown_keyring", f"keyring {slot[0]} v{slot[1]} is not loaded")
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.settings.max_concurrent_unwraps)
        async with self._sem:
            t0 = time.monotonic()
            try:
                _, cms = await self.kms.decrypt(
                    env.encrypted_dek, env.kms_context(), self.recipient(), key_id=env.kms_key_id,
                    deadline=t0 + self.settings.unwrap_timeout_s,
                )  # fmt: skip
            except KmsError as exc:
                raise _kms_failure(exc) from None
            finally:
                self.stats["kms_decrypt"] += 1
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

    def _open_cms(self, cms: bytes | None) -> bytes:
        if cms is None:
            raise VaultError("kms_protocol", "KMS returned no CiphertextForRecipient")
        try:
            dek = open_enveloped_data(cms, self._rsa)
        except CmsError as exc:
            raise VaultError("kms_protocol", f"CiphertextForRecipient does not open: {exc}") from None
        if len(dek) != 32:
            raise VaultError("kms_protocol", "the data key is not 32 bytes")
        return dek

    def recipient(self) -> dict[str, str]:
        """A fresh attestation document over the (reused) RSA public key."""
        doc = self.attestation.document(public_key=self._spki)
        return {"AttestationDocument": base64.b64encode(doc).decode(), "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}

    # -- key management -----------------------------------------------------------------------------

    def _lock(self, keyring_id: str) -> asyncio.Lock:
        return self._keyring_locks.setdefault(keyring_id, asyncio.Lock())

    async def _new_keyring(
        self, keyring_id: str, kms_key_id: str, version: int
    ) -> tuple[KeyringEnvelope, CachedDataKey]:
        env = KeyringEnvelope(keyring_id, kms_key_id, version, b"", int(time.time() * 1000))
        try:
            dk = await self.kms.generate_data_key(
                kms_key_id,
                env.kms_context(),
                self.recipient(),
                deadline=time.monotonic() + self.settings.unwrap_timeout_s,
            )
        except KmsError as exc:
            raise _kms_failure(exc) from None
        finally:
            self.stats["kms_generate_data_key"] += 1
        dek = self._open_cms(dk.ciphertext_for_recipient)
        env = KeyringEnvelope(keyring_id, kms_key_id, version, dk.ciphertext_blob, env.created_ms)
        self.load([env], [])
        return env, self.cache.put(keyring_id, version, dek)

    async def _add_key(
        self, keyring_id: str, scheme: str, kms_key_id: str, secret: bytearray, policy: dict[str, Any] | None
    ) -> dict[str, Any]:
        try:
            try:
                parse_policy(policy)
            except PolicyError as exc:
                raise VaultError("invalid_policy", str(exc)) from None
            async with self._lock(keyring_id):
                new_env = None
                version = self.current.get(keyring_id)
                if version is None:
                    if not kms_key_id:
                        raise VaultError("invalid_argument", "a new keyring needs a KMS key id (SIGNER_KMS_KEY_ID)")
                    new_env, entry = await self._new_keyring(keyring_id, kms_key_id, 1)
                else:
                    entry = await self.data_key(keyring_id, version, time.monotonic() + self.settings.unwrap_timeout_s)
                env = self.envelopes[(keyring_id, self.current[keyring_id])]
                key_id = "k_" + secrets.token_hex(10)
                wallet = wallet_from_secret(key_id, scheme, bytes(secret))
                sealed = seal(entry.aead, key_id, env, scheme, wallet.public_key, wallet.address, bytes(secret),
                              int(time.time() * 1000), policy)  # fmt: skip
        finally:
            secret[:] = bytes(len(secret))
        self.sealed[key_id] = sealed
        entry.wallets[key_id] = wallet
        return {
            "key": sealed.describe(),
            "sealed": sealed.to_wire(),
            "envelope": new_env.to_wire() if new_env else None,
        }

    async def create_key(
        self, keyring_id: str, scheme: str, kms_key_id: str, policy: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self._add_key(keyring_id, scheme, kms_key_id, bytearray(new_secret(scheme)), policy)

    def import_target(self) -> dict[str, Any]:
        """An attestation document carrying the RSA key that key imports are encrypted to."""
        return {"attestation_document": self.attestation.document(public_key=self._spki)}

    async def import_key(
        self, keyring_id: str, scheme: str, kms_key_id: str, encrypted_key: bytes, policy: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        try:
            secret = bytearray(self._rsa.decrypt(encrypted_key, OAEP_SHA256))
        except ValueError:
            raise VaultError("invalid_argument", "the key is not RSA-OAEP-SHA256-encrypted to this enclave") from None
        return await self._add_key(keyring_id, scheme, kms_key_id, secret, policy)

    async def rotate_dek(self, keyring_id: str, kms_key_id: str) -> dict[str, Any]:
        """A new data key version for the keyring; every key of the keyring is sealed again under it."""
        async with self._lock(keyring_id):
            version = self.current.get(keyring_id)
            if version is None:
                raise VaultError("unknown_keyring", f"no keyring {keyring_id!r}")
            old_entry = await self.data_key(keyring_id, version, time.monotonic() + self.settings.unwrap_timeout_s)
            old_env = self.envelopes[(keyring_id, version)]
            new_env, new_entry = await self._new_keyring(keyring_id, kms_key_id or old_env.kms_key_id, version + 1)
            resealed = []
            for sealed in [k for k in self.sealed.values() if k.keyring_id == keyring_id and k.dek_version == version]:
                secret = bytearray(unseal(old_entry.aead, sealed))
                try:
                    again = seal(new_entry.aead, sealed.key_id, new_env, sealed.scheme, sealed.public_key,
                                 sealed.address, bytes(secret), sealed.created_ms, sealed.policy)  # fmt: skip
                finally:
                    secret[:] = bytes(len(secret))
                self.sealed[sealed.key_id] = again
                resealed.append(again.to_wire())
            self.cache.drop(keyring_id, version)  # the old data key is no longer needed here
            return {"envelope": new_env.to_wire(), "sealed": resealed}

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self.cache.clear()
        await self.kms.close()


def _kms_failure(exc: KmsError) -> VaultError:
    if exc.code == "AccessDeniedException":
        return VaultError("kms_access_denied", "KMS refused the data key to this enclave image", status="error")
    if exc.code == "ThrottlingException":
        return VaultError("kms_throttled", "KMS kept throttling until the deadline")
    if exc.code == "TransportError":
        return VaultError("kms_unavailable", exc.message)
    return VaultError("kms_error", f"{exc.code}: {exc.message}"[:200])
