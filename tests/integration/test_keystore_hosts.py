"""Two `signer host` processes that share nothing but Kafka: no directory, each its own enclave,
its own request and admin topics and consumer group, and one key store - the compacted topic
(kafka:///...) both tail. Created with small segments and a short cleaner back-off so that the
broker really compacts it during the test.

A key created through host A signs through host B within a second; both rebuild their view from
the topic after a restart (with fresh enclaves, which know nothing but what the host loads); a
creation race on one keyring from both hosts leaves one winner both agree on; compaction loses no
key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from broker.topics import TopicLayout, ensure_keys_topic
from schemas.refusals import Refused
from signer.keystore import dek_tag, open_keystore
from signer.topology import Topology
from tests.conftest import topology
from tests.integration.test_host import HOST_SETTINGS, ResultReader, check_signed, requests_for

# segments roll every 100 ms (on the next append) and any dirty segment is cleanable at once
COMPACT_SOON = {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.001", "min.compaction.lag.ms": "0",
                "delete.retention.ms": "100"}  # fmt: skip


@pytest.fixture
async def short_cleaner_backoff(bootstrap: str) -> AsyncIterator[None]:
    """The broker's log cleaner looks for work every 15 s by default; every 200 ms during this test
    (a cluster-wide dynamic setting, removed afterwards)."""
    await _cleaner_backoff(bootstrap, "200")
    try:
        yield
    finally:
        await _cleaner_backoff(bootstrap, None)


async def _cleaner_backoff(bootstrap: str, value: str | None) -> None:
    """Set (or, with None, remove) log.cleaner.backoff.ms on every broker as a per-broker dynamic
    setting (nothing else in the suite sets dynamic broker settings)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        brokers = (await admin.describe_cluster())["brokers"]
        configs = {"log.cleaner.backoff.ms": value} if value is not None else {}
        await admin.alter_configs([ConfigResource(ConfigResourceType.BROKER, str(b["node_id"]), configs)
                                   for b in brokers])  # fmt: skip
    finally:
        await admin.close()


@pytest.fixture
async def cluster(
    bootstrap: str, layout: TopicLayout, tmp_path: Path, sock_dir: Path, short_cleaner_backoff: None
) -> AsyncIterator[Topology]:
    topic = f"{layout.requests}.keys"
    await ensure_keys_topic(bootstrap, topic, configs=COMPACT_SOON)
    c = topology(tmp_path, sock_dir, bootstrap, layout, host_settings=HOST_SETTINGS, log_level="INFO",
                 keystore=f"kafka:///{topic}")  # fmt: skip
    try:
        await c.start_kms()
        await c.provision()
        yield c
    finally:
        await c.aclose(kill=True)


def side(layout: TopicLayout, name: str) -> TopicLayout:
    """Host `name`'s own topics: requests for it reach it and no other host."""
    return replace(layout, requests=f"{layout.requests}.{name}", results=f"{layout.results}.{name}",
                   admin=f"{layout.admin}.{name}", admin_replies=f"{layout.admin_replies}.{name}")  # fmt: skip


async def start_side(c: Topology, name: str) -> None:
    """Host `name` with its enclave `e-name`, its topics and its consumer group."""
    assert c.layout is not None
    if f"e-{name}" not in c.enclaves:
        await c.start_enclave(f"e-{name}")
    await c.start_host(name, layout=side(c.layout, name), group_id=f"g-{name}-{c.layout.requests}",
                       enclaves=[c.enclaves[f"e-{name}"].url])  # fmt: skip


async def sign_through(c: Topology, name: str, keys: list[dict[str, Any]], prefix: str) -> float:
    """Sign one request per key through host `name`; check every signature; the seconds it took."""
    assert c.layout is not None
    topics = side(c.layout, name)
    reqs = requests_for(keys, len(keys), f"{prefix}-{name}-")
    async with ResultReader(c.bootstrap, topics.results) as reader:
        producer = AIOKafkaProducer(bootstrap_servers=c.bootstrap, acks="all")
        await producer.start()
        t0 = time.monotonic()
        try:
            for r in reqs:
                await producer.send(topics.requests, msgpack.packb(r), key=r["key_id"].encode())
            await producer.flush()
        finally:
            await producer.stop()
        await reader.wait_for({r["request_id"] for r in reqs}, timeout=60)
        elapsed = time.monotonic() - t0
        failed = {rid: got[0].get("error") for rid, got in reader.by_id.items() if got[0]["status"] != "ok"}
        assert not failed, failed
        check_signed(reqs, keys, reader.by_id)
    return elapsed


async def records_in(bootstrap: str, topic: str) -> tuple[int, int]:
    """(records a reader from the beginning finds, the end offset): fewer records than offsets once
    the broker has compacted."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        count = 0
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=500)
            count += sum(len(v) for v in batch.values())
        return count, end
    finally:
        await consumer.stop()


async def restart(c: Topology, names: list[str]) -> None:
    """Stop the hosts and their enclaves, then start fresh ones: the enclaves know nothing, and what
    each host loads into them it read from the topic."""
    for name in names:
        await c.hosts.pop(name).process.astop()
        await c.enclaves.pop(f"e-{name}").process.astop()
    for name in names:
        await start_side(c, name)


async def test_two_hosts_share_keys_through_the_compacted_topic(cluster: Topology) -> None:
    c = cluster
    assert c.layout is not None
    topic = c.keystore_url.removeprefix("kafka:///")
    await start_side(c, "a")
    await start_side(c, "b")
    op_a, op_b = c.operator(side(c.layout, "a")), c.operator(side(c.layout, "b"))

    # created through A, signed through B (whose enclave answers unknown_key first) within a second
    first = await op_a.create_key("secp256k1", "shared")
    elapsed = await sign_through(c, "b", [first], "fresh")
    print(f"\nkey created through host A signed through host B in {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0, elapsed

    # both hosts create the first key of one new keyring at once
    outcomes = await asyncio.gather(op_a.create_key("secp256k1", "raced"), op_b.create_key("secp256k1", "raced"),
                                    return_exceptions=True)  # fmt: skip
    made = [o for o in outcomes if isinstance(o, dict)]
    lost = [o for o in outcomes if not isinstance(o, dict)]
    assert made and all(isinstance(o, Refused) and o.code == "keyring_conflict" for o in lost), outcomes
    print(f"creation race: {len(made)} created, {len(lost)} keyring_conflict")
    watcher = open_keystore(c.keystore_url, bootstrap=c.bootstrap)
    await watcher.start()
    try:
        winner = watcher.get_envelope("raced")
        assert winner is not None and winner.dek_version == 1
        assert {k["key_id"] for k in made} <= {k.key_id for k in watcher.keys() if k.keyring_id == "raced"}
    finally:
        await watcher.close()
    # both hosts sign the winner's keys now: the loser's enclave, which had unwrapped its own data key for
    # that keyring version, is given the winning envelope with the keys and drops the loser's data key
    for name in ("a", "b"):
        await sign_through(c, name, [first, *made], "raced")

    # more keys, some keys stored again (records that compaction may drop), then segments roll and the
    # broker compacts the topic
    more = [await op_b.create_key("ed25519" if i % 2 else "secp256k1", "shared") for i in range(3)]
    eth = [k for k in [first, *made, *more] if k["scheme"] == "secp256k1"]
    await _store_again(c, topic)
    async with asyncio.timeout(60):
        while True:
            count, end = await records_in(c.bootstrap, topic)
            if count < end:
                break
            await _store_again(c, topic)  # an append rolls the segment that is old enough; compaction follows
            await asyncio.sleep(0.3)  # poll interval: the broker's cleaner runs on its own schedule
    print(f"compacted: {count} records left of {end} offsets")

    # both hosts restart with fresh enclaves and rebuild their view from the compacted topic
    await restart(c, ["a", "b"])
    for name in ("a", "b"):  # both converge on the race's winner too
        await sign_through(c, name, eth, "after")
    listed = {k["key_id"] for k in await op_a.list_keys()}
    assert {k["key_id"] for k in [first, *made, *more]} <= listed, listed


async def _store_again(c: Topology, topic: str) -> None:
    """Every current key record written once more under its record key: the older copies become
    what compaction removes."""
    store = open_keystore(c.keystore_url, bootstrap=c.bootstrap)
    await store.start()
    try:
        producer = AIOKafkaProducer(bootstrap_servers=c.bootstrap, acks="all")
        await producer.start()
        try:
            for key in store.keys():
                env = store.get_envelope(key.keyring_id)
                assert env is not None
                name = f"k/{key.keyring_id}/{key.dek_version}/{dek_tag(env)}/{key.key_id}"
                value = msgpack.packb(key.to_wire(), use_bin_type=True)
                await producer.send_and_wait(topic, value, key=name.encode(), partition=0)
        finally:
            await producer.stop()
    finally:
        await store.close()
