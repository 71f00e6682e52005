"""One contract every key store backend keeps (signer/keystore.py): dir, kafka (the session's real
Kafka), s3 and dynamodb (moto in server mode, a real HTTP server on an ephemeral port).

The records are shaped like the enclave's but made here: the store is untrusted storage and never
opens a record, so these tests need no enclave."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiokafka import AIOKafkaProducer

from schemas.records import KeyringEnvelope, SealedKey
from signer.keystore import KeyringConflict, KeyStore, dek_tag, open_keystore, read_keys
from tests.moto_server import AWS_TEST_ENV, aws_client, create_table

BACKENDS = ["dir", "kafka", "s3", "dynamodb"]
GARBAGE = b"\xc1 not a record"


def envelope(ring: str, version: int = 1) -> KeyringEnvelope:
    return KeyringEnvelope(ring, "arn:aws:kms:us-east-1:111122223333:key/test", version, os.urandom(96),
                           int(time.time() * 1000))  # fmt: skip


def sealed(ring: str, version: int = 1, key_id: str | None = None) -> SealedKey:
    return SealedKey(key_id or "k_" + os.urandom(16).hex(), ring, version, "secp256k1", b"\x04" + os.urandom(64),
                     None, os.urandom(12), os.urandom(48), int(time.time() * 1000))  # fmt: skip


# -- where each backend keeps its records ------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@dataclass
class Place:
    """A fresh location in one backend, and stores opened on it (closed at the end of the test)."""

    backend: str
    url: str
    bootstrap: str = ""
    endpoint: str = ""
    root: Path | None = None
    opened: list[KeyStore] = field(default_factory=list)

    async def store(self, **kafka: Any) -> KeyStore:
        store = open_keystore(self.url, bootstrap=self.bootstrap, **kafka)
        self.opened.append(store)
        await store.start()
        return store

    async def write_raw(self, name: str, data: bytes) -> None:
        """A record written behind the store's back: `name` is its object/file/record key."""
        if self.backend == "dir":
            assert self.root is not None
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        elif self.backend == "kafka":
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(self.url.removeprefix("kafka:///"), data, key=name.encode(), partition=0)
            finally:
                await producer.stop()
        elif self.backend == "s3":
            client = aws_client("s3", self.endpoint)
            bucket, prefix = self.url.removeprefix("s3://").split("?")[0].split("/", 1)
            await asyncio.to_thread(client.put_object, Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
        else:
            client = aws_client("dynamodb", self.endpoint)
            table = self.url.removeprefix("dynamodb://").split("?")[0]
            await asyncio.to_thread(client.put_item, TableName=table,
                                    Item={"pk": {"S": name}, "record": {"B": data}})  # fmt: skip


def raw_names(backend: str, env: KeyringEnvelope, key: SealedKey) -> tuple[str, str]:
    """Where an envelope and a key sealed under it are kept, as each backend names them."""
    ring, v, tag = env.keyring_id, env.dek_version, dek_tag(env)
    return {
        "dir": (f"{ring}/envelope.v{v}.msgpack", f"{ring}/keys/{key.key_id}.v{v}.{tag}.msgpack"),
        "kafka": (f"e/{ring}/{v}/{uuid.uuid4().hex}", f"k/{ring}/{v}/{tag}/{key.key_id}"),
        "s3": (f"{ring}/envelope.v{v}.msgpack", f"{ring}/keys/{key.key_id}.v{v}.{tag}.msgpack"),
        "dynamodb": (f"e/{ring}/{v}", f"k/{ring}/{v}/{tag}/{key.key_id}"),
    }[backend]


@pytest.fixture(params=BACKENDS)
async def place(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Place]:
    backend, tag = request.param, uuid.uuid4().hex[:8]
    if backend == "dir":
        p = Place("dir", f"dir://{tmp_path / 'keystore'}", root=tmp_path / "keystore")
    elif backend == "kafka":
        p = Place("kafka", f"kafka:///t{tag}.sign.keys", bootstrap=request.getfixturevalue("bootstrap"))
    else:
        request.getfixturevalue("aws_env")
        endpoint = request.getfixturevalue("moto")
        if backend == "s3":
            await asyncio.to_thread(aws_client("s3", endpoint).create_bucket, Bucket=f"keys-{tag}")
            p = Place("s3", f"s3://keys-{tag}/cluster-a?endpoint={endpoint}", endpoint=endpoint)
        else:
            await asyncio.to_thread(create_table, endpoint, f"keys-{tag}")
            p = Place("dynamodb", f"dynamodb://keys-{tag}?endpoint={endpoint}", endpoint=endpoint)
    try:
        yield p
    finally:
        for store in p.opened:
            await store.close()


def wire(records: list[Any]) -> list[dict[str, Any]]:
    return sorted((r.to_wire() for r in records), key=lambda w: (w["keyring_id"], w.get("key_id", "")))


# -- the contract --------------------------------------------------------------------------------------------


async def test_what_is_put_is_what_is_got_and_listed(place: Place) -> None:
    store = await place.store()
    assert store.envelopes() == [] and store.keys() == [] and store.get_key("k_00") is None
    env_a, env_b = envelope("ring-a"), envelope("ring_b")
    keys_a, keys_b = [sealed("ring-a") for _ in range(3)], [sealed("ring_b")]
    await store.put_envelope(env_a)
    await store.put_keys(env_a, keys_a)
    await store.put_envelope(env_b)
    await store.put_keys(env_b, keys_b)
    assert store.get_envelope("ring-a") == env_a and store.get_envelope("nowhere") is None
    assert all(store.get_key(k.key_id) == k for k in keys_a + keys_b)
    assert wire(store.envelopes()) == wire([env_a, env_b])
    assert wire(store.keys()) == wire(keys_a + keys_b)


async def test_a_second_creator_of_a_keyring_version_gets_keyring_conflict(place: Place) -> None:
    first, second = await place.store(), await place.store()
    mine = envelope("contested")
    await first.put_envelope(mine)
    with pytest.raises(KeyringConflict):
        await second.put_envelope(envelope("contested"))  # it has not even read the first one
    await second.put_envelope(mine)  # the same record again (a copy, a retry) is no conflict
    await second.refresh()
    assert second.get_envelope("contested") == first.get_envelope("contested") == mine


async def test_of_two_creators_racing_exactly_one_wins_and_both_agree(place: Place) -> None:
    a, b = await place.store(), await place.store()
    env_a, env_b = envelope("race"), envelope("race")
    outcomes = await asyncio.gather(a.put_envelope(env_a), b.put_envelope(env_b), return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["KeyringConflict", "NoneType"], outcomes
    winner = env_a if outcomes[0] is None else env_b
    await a.refresh()
    await b.refresh()
    assert a.get_envelope("race") == b.get_envelope("race") == winner


async def test_refresh_sees_another_writers_records(place: Place) -> None:
    reader, writer = await place.store(), await place.store()
    env = envelope("later")
    keys = [sealed("later") for _ in range(2)]
    await writer.put_envelope(env)
    await writer.put_keys(env, keys)
    await reader.refresh()
    assert reader.get_envelope("later") == env and all(reader.get_key(k.key_id) == k for k in keys)
    more = sealed("later")
    await writer.put_keys(env, [more])
    await reader.refresh()
    assert reader.get_key(more.key_id) == more


async def test_a_restarted_store_rebuilds_the_same_view(place: Place) -> None:
    store = await place.store()
    env1 = envelope("kept")
    old = [sealed("kept") for _ in range(3)]
    await store.put_envelope(env1)
    await store.put_keys(env1, old)
    env2 = envelope("kept", 2)
    rotated = [sealed("kept", 2, k.key_id) for k in old]
    await store.put_keys(env2, rotated)  # keys first: version 2 is current once its envelope is stored
    assert wire(store.keys()) == wire(old)
    await store.put_envelope(env2)
    assert wire(store.keys()) == wire(rotated) and store.get_envelope("kept") == env2
    before = (wire(store.envelopes()), wire(store.keys()))
    await store.close()
    again = await place.store()
    assert (wire(again.envelopes()), wire(again.keys())) == before


async def test_a_losing_rotation_leaves_the_winners_keys(place: Place) -> None:
    """Two rotations race: both store their resealed keys, then their envelopes; the loser's keys
    (same key ids, another data key) never replace the winner's."""
    a, b = await place.store(), await place.store()
    env1 = envelope("rot")
    members = [sealed("rot") for _ in range(2)]
    await a.put_envelope(env1)
    await a.put_keys(env1, members)
    env_a, env_b = envelope("rot", 2), envelope("rot", 2)
    keys_a = [sealed("rot", 2, k.key_id) for k in members]
    keys_b = [sealed("rot", 2, k.key_id) for k in members]
    await a.put_keys(env_a, keys_a)
    await b.put_keys(env_b, keys_b)
    await a.put_envelope(env_a)
    with pytest.raises(KeyringConflict):
        await b.put_envelope(env_b)
    fresh = await place.store()
    assert fresh.get_envelope("rot") == env_a and wire(fresh.keys()) == wire(keys_a)


async def test_garbled_records_are_skipped_and_the_rest_loads(place: Place) -> None:
    store = await place.store()
    good_env = envelope("good")
    good = sealed("good")
    await store.put_envelope(good_env)
    await store.put_keys(good_env, [good])
    bad_env = envelope("bad")
    env_name, key_name = raw_names(place.backend, bad_env, sealed("bad"))
    _, bad_key_name = raw_names(place.backend, good_env, sealed("good"))
    wrong_ring = msgpack.packb({**sealed("elsewhere").to_wire()}, use_bin_type=True)  # names another keyring
    await place.write_raw(env_name, GARBAGE)
    await place.write_raw(key_name, GARBAGE)
    await place.write_raw(bad_key_name, wrong_ring)
    fresh = await place.store()
    assert fresh.get_envelope("good") == good_env and wire(fresh.keys()) == wire([good])
    assert fresh.get_envelope("bad") is None
    assert fresh.invalid == 3, fresh.invalid
    await store.refresh()  # a running store reading them skips them too
    assert wire(store.keys()) == wire([good]) and store.invalid == 3


# -- the Kafka store's rule, as written in docs/keystore.md --------------------------------------------------


async def test_kafka_the_lowest_offset_envelope_wins_whoever_reads(bootstrap: str) -> None:
    """Two envelopes for one keyring version written straight to the topic, as two racing hosts
    would: every store that reads the topic takes the first; keys sealed under the second are ignored."""
    topic = f"t{uuid.uuid4().hex[:8]}.sign.keys"
    place = Place("kafka", f"kafka:///{topic}", bootstrap=bootstrap)
    try:
        watcher = await place.store()
        first, second = envelope("ring"), envelope("ring")
        k_first, k_second = sealed("ring"), sealed("ring")
        for env, key in ((first, k_first), (second, k_second)):
            env_name, key_name = raw_names("kafka", env, key)
            await place.write_raw(env_name, msgpack.packb(env.to_wire(), use_bin_type=True))
            await place.write_raw(key_name, msgpack.packb(key.to_wire(), use_bin_type=True))
        await watcher.refresh()
        late = await place.store()
        for store in (watcher, late):
            assert store.get_envelope("ring") == first
            assert store.get_key(k_first.key_id) == k_first and store.get_key(k_second.key_id) is None
    finally:
        for store in place.opened:
            await store.close()


async def test_a_snapshot_reader_sees_the_current_keys(place: Place, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_keys: what a reader that holds no store (the gateway's public key directory) gets."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP", place.bootstrap or "127.0.0.1:1")
    assert await asyncio.to_thread(read_keys, place.url) == []  # nothing stored yet: nothing created either
    store = await place.store()
    env = envelope("snap")
    keys = [sealed("snap") for _ in range(2)]
    await store.put_envelope(env)
    await store.put_keys(env, keys)
    assert wire(await asyncio.to_thread(read_keys, place.url)) == wire(keys)


async def test_kafka_a_long_topic_is_read_however_long_it_takes_while_it_moves(bootstrap: str) -> None:
    """A new host reading a large store: 40,000 records take longer than the store's read timeout (here
    2 s; each record is slowed down), but the reader keeps moving, so the store starts and holds them
    all. (A million keys used to stop a new host at start: the whole read had to fit in 10 s.)"""
    from signer.keystore_kafka import KafkaKeyStore

    topic = f"t{uuid.uuid4().hex[:8]}.sign.keys"
    writer = KafkaKeyStore(bootstrap, topic)
    await writer.start()  # creates the topic
    await writer.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    try:
        n = 40_000
        for i in range(n):  # records of no known kind: read, counted and skipped
            await producer.send(topic, b"x" * 200, key=f"other/{i}".encode(), partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    reader = KafkaKeyStore(bootstrap, topic, read_timeout_s=2.0, writer=False)
    apply = reader._apply

    def slow_apply(offset: int, key: bytes | None, value: bytes | None) -> None:  # 40,000 x 100 us: 4 s
        time.sleep(100e-6)
        apply(offset, key, value)

    reader._apply = slow_apply  # type: ignore[method-assign]
    t0 = time.perf_counter()
    await reader.start()
    try:
        assert reader.records == n
        assert time.perf_counter() - t0 > 2.0  # longer than the timeout: only progress kept it waiting
    finally:
        await reader.close()
