"""The real broker the project provisions: round trips, idempotence, transactions, topic layout."""

from __future__ import annotations

import os
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from broker.clients import request_consumer, result_producer
from broker.local_kafka import KafkaUnavailable, LocalKafka, api_versions_ok, free_port, provision
from broker.topics import TopicLayout, ensure_topics


async def _consume_all(bootstrap: str, topic: str, n: int, **kw: object) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, **kw)  # type: ignore[arg-type]  # fmt: skip
    await consumer.start()
    out: list[bytes] = []
    try:
        while len(out) < n:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                break  # nothing more arrived within a second after the last record
            for recs in batch.values():
                out.extend(r.value for r in recs)  # type: ignore[misc]
    finally:
        await consumer.stop()
    return out


def test_broker_answers_api_versions(kafka: LocalKafka) -> None:
    assert kafka.port is not None and api_versions_ok(kafka.host, kafka.port)
    assert not api_versions_ok("127.0.0.1", free_port())


async def test_topic_layout_is_created_with_configured_partitions(bootstrap: str, layout: TopicLayout) -> None:
    await ensure_topics(bootstrap, layout)
    await ensure_topics(bootstrap, layout)  # idempotent
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(
            [layout.requests, layout.results, layout.dlq])}  # fmt: skip
    finally:
        await admin.close()
    assert described == {layout.requests: 4, layout.results: 2, layout.dlq: 3}
    assert TopicLayout().request_partitions == 12


async def test_produce_consume_round_trip_with_safe_defaults(bootstrap: str, layout: TopicLayout) -> None:
    await ensure_topics(bootstrap, layout)
    producer = result_producer(bootstrap)
    await producer.start()
    values = [uuid.uuid4().bytes for _ in range(100)]
    try:
        for v in values:
            await producer.send(layout.results, v, key=v[:4])
        await producer.flush()
    finally:
        await producer.stop()
    consumer = request_consumer(bootstrap, layout.results, group_id=f"g-{uuid.uuid4()}")
    await consumer.start()
    got: list[bytes] = []
    try:
        while len(got) < len(values):
            for tp, recs in (await consumer.getmany(timeout_ms=1000)).items():
                got.extend(r.value for r in recs)  # type: ignore[misc]
                await consumer.commit({tp: recs[-1].offset + 1})
    finally:
        await consumer.stop()
    assert sorted(got) == sorted(values)


async def test_transactions_commit_and_abort_on_kafka_4(bootstrap: str, layout: TopicLayout) -> None:
    await ensure_topics(bootstrap, layout)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{uuid.uuid4()}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(layout.dlq, b"committed", partition=0)
        await producer.begin_transaction()
        await producer.send(layout.dlq, b"aborted", partition=0)
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(layout.dlq, b"after", partition=0)
    finally:
        await producer.stop()
    got = await _consume_all(bootstrap, layout.dlq, 2, isolation_level="read_committed")
    assert got == [b"committed", b"after"]


def test_missing_java_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KafkaUnavailable) as info:
        provision(cache_dir=tmp_path)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "java not found" in msg and "docker compose up kafka" in msg and "\n" not in msg


def test_stop_ends_the_broker_process(tmp_path: os.PathLike[str]) -> None:
    broker = LocalKafka(data_dir=tmp_path).start()  # type: ignore[arg-type]
    pid = broker.pid
    assert pid is not None
    broker.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert broker.port is not None and not api_versions_ok(broker.host, broker.port)


def test_a_fixed_port_that_is_taken_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        broker = LocalKafka(data_dir=tmp_path, port=squatter.getsockname()[1])  # type: ignore[arg-type]
        with pytest.raises(KafkaUnavailable, match="could not bind its ports"):
            broker.start()
        assert broker.pid is None  # nothing left running
