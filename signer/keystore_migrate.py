"""`signer keys migrate --from URL --to URL`: copy a key store's current records into another store.

What is copied is what hosts load: each keyring's current envelope and the keys sealed under it.
Copying again is harmless (a record already there as it is is not written again; an envelope the
target holds as it is counts as copied). Afterwards the target is opened afresh - its view rebuilt
from what it stores - and every copied record is compared with the source's; any difference fails
the migration. A target that holds another envelope for a keyring version, or a later version of a
keyring, is refused: migrating never overwrites a keyring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .keystore import KeyringConflict, KeyStore, KeyStoreError, open_keystore

CHUNK = 1000  # sealed keys per put_keys call


@dataclass
class Migration:
    source: str
    target: str
    keyrings: int = 0
    keys: int = 0
    verified: bool = False

    def summary(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "keyrings": self.keyrings, "keys": self.keys,
                "verified": self.verified}  # fmt: skip


async def migrate(source_url: str, target_url: str, *, bootstrap: str = "") -> Migration:
    """Copy, then verify against a freshly opened target; KeyStoreError says what went wrong."""
    if source_url.rstrip("/") == target_url.rstrip("/"):
        raise KeyStoreError("--from and --to name the same key store")
    result = Migration(source_url, target_url)
    source = open_keystore(source_url, bootstrap=bootstrap)
    target = open_keystore(target_url, bootstrap=bootstrap)
    await source.start()
    try:
        await target.start()
        try:
            await _copy(source, target, result)
        finally:
            await target.close()
        check = open_keystore(target_url, bootstrap=bootstrap)
        await check.start()
        try:
            _verify(source, check)
        finally:
            await check.close()
    finally:
        await source.close()
    result.verified = True
    return result


async def _copy(source: KeyStore, target: KeyStore, result: Migration) -> None:
    members: dict[str, list[Any]] = {}
    for key in source.keys():
        members.setdefault(key.keyring_id, []).append(key)
    for env in sorted(source.envelopes(), key=lambda e: e.keyring_id):
        there = target.get_envelope(env.keyring_id)
        if there is not None and there.dek_version > env.dek_version:
            raise KeyStoreError(f"{target.url} holds keyring {env.keyring_id} at version {there.dek_version}, "
                                f"later than {source.url}'s {env.dek_version}: not overwritten")  # fmt: skip
        try:
            await target.put_envelope(env)
        except KeyringConflict:
            raise KeyStoreError(f"{target.url} holds another envelope for keyring {env.keyring_id} version "
                                f"{env.dek_version}: not overwritten") from None  # fmt: skip
        keys = members.get(env.keyring_id, [])
        for i in range(0, len(keys), CHUNK):
            await target.put_keys(env, keys[i : i + CHUNK])
        result.keyrings += 1
        result.keys += len(keys)


def _verify(source: KeyStore, target: KeyStore) -> None:
    wrong = [f"keyring {e.keyring_id}" for e in source.envelopes() if target.get_envelope(e.keyring_id) != e]
    wrong += [f"key {k.key_id}" for k in source.keys() if target.get_key(k.key_id) != k]
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise KeyStoreError(f"{target.url} does not hold what was copied: {', '.join(wrong[:5])}{more}")
