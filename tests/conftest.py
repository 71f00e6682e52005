"""Test session set-up: one real Kafka broker (KRaft, from Maven Central jars) for the session.

Every test gets its own topic names and consumer group, so tests never see
each other's records. Processes started by tests are stopped by pid.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker.kafka_cluster import LocalKafkaCluster
from broker.local_kafka import LocalKafka
from broker.topics import TopicLayout
from signer.topology import ChildProcess, Topology


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """The session's broker; KAFKA_BOOTSTRAP is never used here, tests own their Kafka."""
    broker = LocalKafka(data_dir=tmp_path_factory.mktemp("kafka"))
    broker.start()
    print(f"\nKafka {broker.version} ready at {broker.bootstrap} in {broker.startup_seconds:.1f}s")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def bootstrap(kafka: LocalKafka) -> str:
    return kafka.bootstrap


@pytest.fixture(scope="session")
def kafka3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafkaCluster]:
    """A three-node KRaft cluster (each node a broker and a controller), started only for the
    sessions that have a test asking for it; tests that stop or kill a node start it again."""
    cluster = LocalKafkaCluster(brokers=3, data_dir=tmp_path_factory.mktemp("kafka3"))
    cluster.start()
    rss = ", ".join(f"{r / 2**20:.0f}" for r in cluster.rss_bytes() if r)
    print(f"\nKafka {cluster.version} x3 at {cluster.bootstrap} in {cluster.startup_seconds:.1f}s, RSS MiB {rss}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def layout() -> TopicLayout:
    """Fresh topic names for one test."""
    tag = uuid.uuid4().hex[:8]
    base = TopicLayout()
    return replace(
        base,
        requests=f"t{tag}.sign.requests",
        results=f"t{tag}.sign.results",
        dlq=f"t{tag}.sign.dlq",
        admin=f"t{tag}.sign.admin",
        admin_replies=f"t{tag}.sign.admin.replies",
        request_partitions=4,
        result_partitions=2,
    )


def topology(tmp: Path, sock_dir: Path, bootstrap: str, layout: TopicLayout, **kw: Any) -> Topology:
    """A topology (signer/topology.py) on the session's Kafka with the test's topics and a consumer
    group of its own; child processes log to tmp/NAME.log, for diagnosis."""
    return Topology(tmp, sock_dir=sock_dir, log_dir=tmp, bootstrap=bootstrap, layout=layout,
                    group_id=f"g-{layout.requests}", **kw)  # fmt: skip


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    # Unix socket paths are limited to ~108 bytes; pytest's tmp paths can be long
    d = Path("/tmp") / f"sig-{uuid.uuid4().hex[:10]}"
    d.mkdir()
    yield d  # type: ignore[misc]
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYTHONPATH", str(ROOT))


async def committed_and_end_offsets(
    bootstrap: str, group: str, layout: TopicLayout
) -> tuple[dict[Any, int], dict[Any, int]]:
    """Per request partition: the group's committed offset (0 if none) and the log end offset."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(layout.requests, p) for p in range(layout.request_partitions)]
        ends = await consumer.end_offsets(parts)
    finally:
        await consumer.stop()
    return {tp: committed[tp].offset if tp in committed else 0 for tp in parts}, dict(ends)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server (S3 and DynamoDB, tests/moto_server.py), started for the module that asks for it and
    stopped by pid; its endpoint URL."""
    proc = ChildProcess("tests.moto_server", log=tmp_path_factory.mktemp("moto") / "moto.log").spawn()
    try:
        yield proc.wait_ready(60)
    finally:
        proc.stop()
