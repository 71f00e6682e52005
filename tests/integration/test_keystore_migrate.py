"""`python -m signer keys migrate --from URL --to URL`: copies what hosts load, verifies every record
in a freshly opened target, can be run again without writing anything new, and never overwrites a
keyring the target holds differently."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from signer.keystore import DirectoryKeyStore, KeyStore, open_keystore
from tests.conftest import ROOT
from tests.integration.test_keystore_contract import envelope, sealed, wire
from tests.moto_server import AWS_TEST_ENV, aws_client

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "SIGNER_", "AWS_"))}


def migrate(source: str, target: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signer", "keys", "migrate", "--from", source, "--to", target],
                          env={**CLEAN_ENV, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)  # fmt: skip


async def seeded(root: Path) -> DirectoryKeyStore:
    """Two keyrings, one of them rotated to version 2 (its version-1 keys are not current)."""
    store = DirectoryKeyStore(root)
    await store.start()
    a1, b1 = envelope("alpha"), envelope("beta")
    await store.put_envelope(a1)
    await store.put_keys(a1, [sealed("alpha") for _ in range(3)])
    await store.put_envelope(b1)
    old = [sealed("beta") for _ in range(2)]
    await store.put_keys(b1, old)
    b2 = envelope("beta", 2)
    await store.put_keys(b2, [sealed("beta", 2, k.key_id) for k in old])
    await store.put_envelope(b2)
    return store


async def view(url: str, bootstrap: str = "") -> tuple[list[object], list[object]]:
    store: KeyStore = open_keystore(url, bootstrap=bootstrap)
    await store.start()
    try:
        return wire(store.envelopes()), wire(store.keys())
    finally:
        await store.close()


async def end_offset(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def test_migrate_copies_verifies_and_is_idempotent(
    bootstrap: str, moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    source = await seeded(tmp_path / "src")
    expected = (wire(source.envelopes()), wire(source.keys()))
    assert len(expected[0]) == 2 and len(expected[1]) == 5
    topic = f"t{uuid.uuid4().hex[:8]}.sign.keys"
    kafka_url = f"kafka:///{topic}"
    env = {"KAFKA_BOOTSTRAP": bootstrap, **AWS_TEST_ENV}

    out = await asyncio.to_thread(migrate, source.url, kafka_url, env)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary == {"from": source.url, "to": kafka_url, "keyrings": 2, "keys": 5, "verified": True}
    assert await view(kafka_url, bootstrap) == expected
    written = await end_offset(bootstrap, topic)

    again = await asyncio.to_thread(migrate, source.url, kafka_url, env)
    assert again.returncode == 0 and json.loads(again.stdout) == summary, again.stderr
    assert await end_offset(bootstrap, topic) == written  # nothing written twice

    bucket = f"keys-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(aws_client("s3", moto).create_bucket, Bucket=bucket)
    s3_url = f"s3://{bucket}/prod?endpoint={moto}"
    out = await asyncio.to_thread(migrate, kafka_url, s3_url, env)
    assert out.returncode == 0 and json.loads(out.stdout)["verified"] is True, out.stderr
    assert await view(s3_url) == expected


async def test_migrate_never_overwrites_another_keyring_and_names_a_bad_url(bootstrap: str, tmp_path: Path) -> None:
    source = await seeded(tmp_path / "src")
    other = DirectoryKeyStore(tmp_path / "other")
    await other.start()
    await other.put_envelope(envelope("alpha"))  # another data key for keyring alpha, version 1
    out = await asyncio.to_thread(migrate, source.url, other.url, {})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "holds another envelope for keyring alpha version 1: not overwritten" in out.stderr, out.stderr
    bad = await asyncio.to_thread(migrate, source.url, "s3://", {})
    assert bad.returncode == 2 and bad.stderr.strip() == "signer: --to s3://: s3:// needs a bucket: s3://BUCKET/PREFIX"
    no_kafka = await asyncio.to_thread(migrate, source.url, "kafka://", {})
    assert no_kafka.returncode == 2 and "KAFKA_BOOTSTRAP is not set" in no_kafka.stderr
