"""The gateway's public key directory over a store that is not a directory (kafka://, the session's
Kafka): the store is opened once and brought up to date on each refresh, not read afresh; a topic that
did not exist when the gateway started is picked up once a host creates it.

The records are shaped like the enclave's but made here: the directory never opens a sealed record."""

from __future__ import annotations

import os
import time
import uuid

import coincurve

from schemas.records import KeyringEnvelope, SealedKey
from signer.gateway import KeyDirectory
from signer.keystore import open_keystore


def _key(ring: str) -> SealedKey:
    public = coincurve.PrivateKey().public_key.format(False)
    return SealedKey("k_" + os.urandom(10).hex(), ring, 1, "secp256k1", public, None, os.urandom(12),
                     os.urandom(48), int(time.time() * 1000))  # fmt: skip


async def test_a_live_store_is_opened_once_and_refreshed(bootstrap: str) -> None:
    url = f"kafka:///t{uuid.uuid4().hex[:8]}.keys"
    directory = KeyDirectory(url, refresh_s=60, bootstrap=bootstrap)
    writer = open_keystore(url, bootstrap=bootstrap)
    try:
        await directory.refresh(force=True)  # the topic does not exist yet: no keys, nothing created
        assert directory.loaded and directory.by_id == {}
        await writer.start()  # a host creates the topic and stores keys
        env = KeyringEnvelope("ring", "arn:aws:kms:us-east-1:111122223333:key/test", 1, os.urandom(96), 1)
        await writer.put_envelope(env)
        first = _key("ring")
        await writer.put_keys(env, [first])
        await directory.refresh(force=True)
        assert set(directory.by_id) == {first.key_id}
        opened = directory._store
        assert opened is not None
        second = _key("ring")
        await writer.put_keys(env, [second])
        await directory.refresh(force=True)
        found = await directory.find("0x" + second.public_key.hex())
        assert found is not None and found.key_id == second.key_id
        assert directory._store is opened  # the same store, read on from where it was
        assert set(directory.by_id) == {first.key_id, second.key_id}
    finally:
        await directory.close()
        await writer.close()
    assert directory._store is None
