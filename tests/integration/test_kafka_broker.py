"""The real broker the project provisions: round trips, idempotence, transactions, topic layout;
and a three-node cluster of it: formation, replication, a partition leader SIGKILLed, transactions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from broker.clients import request_consumer, result_producer
from broker.kafka_cluster import LocalKafkaCluster
from broker.local_kafka import KafkaUnavailable, LocalKafka, api_versions_ok, free_port, metadata, provision
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


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_python_m_broker_kafka_brokers_3_runs_a_cluster_until_sigterm() -> None:
    """`python -m broker kafka --brokers 3` prints KAFKA_BOOTSTRAP once the three nodes form a
    cluster, and SIGTERM stops every node it started."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "broker", "kafka", "--brokers", "3", "--port", "0"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    jvms: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # the first line, printed once the cluster is ready
        assert line.startswith("KAFKA_BOOTSTRAP="), (line, proc.stderr.read() if proc.poll() is not None else "")
        nodes = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in line.split("=", 1)[1].split(","))]
        assert len(nodes) == 3
        jvms = _children(proc.pid)
        assert len(jvms) == 3
        md = metadata(*nodes[0])
        assert md is not None and sorted(md.brokers.values()) == sorted(nodes)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert all(_gone(pid) for pid in jvms)
        assert not any(api_versions_ok(h, p) for h, p in nodes)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in jvms:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


# -- three brokers (the session's `kafka3` cluster: three combined broker+controller nodes) --------


def test_three_nodes_form_one_cluster_with_a_quorum_of_three(kafka3: LocalKafkaCluster) -> None:
    assert kafka3.bootstrap == ",".join(f"127.0.0.1:{n.port}" for n in kafka3.nodes)
    assert all(api_versions_ok(n.host, n.port) for n in kafka3.nodes)
    md = kafka3.metadata()
    assert md.brokers == {n.node_id: (n.host, n.port) for n in kafka3.nodes}
    quorum = kafka3.quorum()
    assert quorum.voters == (1, 2, 3) and quorum.leader_id in quorum.voters
    assert kafka3.controller() == kafka3.index_of(quorum.leader_id)
    ids = {(n.data_dir / "kraft-logs" / "meta.properties").read_text().split("cluster.id=")[1].split()[0]
           for n in kafka3.nodes}  # fmt: skip
    assert ids == {kafka3.cluster_id}
    assert len({n.pid for n in kafka3.nodes}) == 3 and len({n.data_dir for n in kafka3.nodes}) == 3
    for n in kafka3.nodes:
        props = (n.data_dir / "server.properties").read_text().splitlines()
        assert "process.roles=broker,controller" in props
        assert {"min.insync.replicas=2", "default.replication.factor=3", "offsets.topic.replication.factor=3",
                "transaction.state.log.replication.factor=3", "transaction.state.log.min.isr=2",
                "unclean.leader.election.enable=false", "group.initial.rebalance.delay.ms=0"} <= set(props)  # fmt: skip


async def test_the_topics_command_creates_the_layout_and_the_compacted_keys_topic(bootstrap: str) -> None:
    """`python -m broker topics` (in process): the five topics and the key store's topic, one partition,
    compacted; run twice, it changes nothing."""
    from broker.__main__ import main

    keys_topic = f"keys-{uuid.uuid4().hex[:8]}"
    args = ["topics", "--bootstrap", bootstrap, "--partitions", "3", "--keys-topic", keys_topic, "--timeout", "60"]
    assert await asyncio.to_thread(main, args) == 0
    assert await asyncio.to_thread(main, args) == 0
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([keys_topic])
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, keys_topic)])
    finally:
        await admin.close()
    assert len(described["partitions"]) == 1
    configs = {c[0]: c[1] for r in responses for res in r.resources for c in res[4]}
    assert configs["cleanup.policy"] == "compact"


async def test_topics_on_three_brokers_get_three_replicas_and_two_in_sync(
    kafka3: LocalKafkaCluster, layout: TopicLayout
) -> None:
    await ensure_topics(kafka3.bootstrap, layout)  # the replication factor comes from the cluster
    names = [t.name for t in layout.new_topics()]
    await asyncio.to_thread(kafka3.wait_in_sync, names)  # as every node sees them
    md = await asyncio.to_thread(kafka3.metadata, names)
    assert {name: len(parts) for name, parts in md.topics.items()} == {
        layout.requests: 4, layout.results: 2, layout.dlq: 3, layout.admin: 1, layout.admin_replies: 1}  # fmt: skip
    assert all(sorted(p.replicas) == [1, 2, 3] for parts in md.topics.values() for p in parts.values())
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka3.bootstrap)
    await admin.start()
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name, {"min.insync.replicas": None}) for name in names]
        responses = await admin.describe_configs(resources)
    finally:
        await admin.close()
    min_isr = {res[3]: {c[0]: c[1] for c in res[4]}["min.insync.replicas"]
               for r in responses for res in r.resources}  # fmt: skip
    assert min_isr == dict.fromkeys(names, "2")


class _Writer:
    """An idempotent acks=all producer (the hosts' result producer) writing numbered records over
    every partition of a topic, one batch at a time: a batch returns once each record of it is
    acknowledged, so writing pauses, and resumes, with the partitions' leaders."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.producer = result_producer(bootstrap)
        self.topic, self.partitions = topic, partitions
        self.acked: dict[bytes, tuple[int, int]] = {}  # value -> (partition, offset) acknowledged
        self.failed: list[tuple[bytes, BaseException]] = []
        self.seq = 0

    async def batch(self, n: int = 50) -> None:
        futures = []
        for _ in range(n):
            value = b"m%08d" % self.seq
            futures.append((value, await self.producer.send(self.topic, value, partition=self.seq % self.partitions)))
            self.seq += 1
        for value, fut in futures:
            try:
                md = await fut
                self.acked[value] = (md.partition, md.offset)
            except KafkaError as exc:
                self.failed.append((value, exc))


async def test_idempotent_acks_all_producer_and_consumer_survive_sigkill_of_a_partition_leader(
    kafka3: LocalKafkaCluster, layout: TopicLayout
) -> None:
    """Every acknowledged record is consumed, each exactly once in the log, while the leader of
    partition 0 is SIGKILLed, its partitions fail over, and it is started again."""
    await ensure_topics(kafka3.bootstrap, layout)
    topic, parts = layout.requests, layout.request_partitions
    victim = await asyncio.to_thread(kafka3.leader, topic, 0)
    victim_port, victim_pid = kafka3.nodes[victim].port, kafka3.nodes[victim].pid
    writer = _Writer(kafka3.bootstrap, topic, parts)
    consumer = request_consumer(kafka3.bootstrap, topic, group_id=f"g-{uuid.uuid4()}")
    seen: list[tuple[int, int, bytes]] = []  # (partition, offset, value) as consumed
    done_writing = asyncio.Event()

    async def consume() -> None:
        """Consume (committing, as hosts do) until every acknowledged record has been seen."""
        while True:
            for tp, recs in (await consumer.getmany(timeout_ms=200)).items():
                seen.extend((tp.partition, r.offset, r.value) for r in recs)  # type: ignore[misc]
                with contextlib.suppress(KafkaError):  # a commit lost to a coordinator move: re-read
                    await consumer.commit({tp: recs[-1].offset + 1})
            if done_writing.is_set() and writer.acked.keys() <= {v for _, _, v in seen}:
                return

    def consumed_since(mark: int, partition: int) -> int:
        return sum(1 for p, _, v in seen if p == partition and int(v[1:]) >= mark)

    await writer.producer.start()
    await consumer.start()
    consuming = asyncio.create_task(consume())
    try:
        while len(writer.acked) < 500 or not seen:
            await writer.batch()
        kill_mark, t_kill = writer.seq, time.monotonic()
        await asyncio.to_thread(kafka3.kill, victim)
        await writer.batch()  # held until partition 0 has a new leader
        failover_s = time.monotonic() - t_kill
        while consumed_since(kill_mark, 0) < 200:
            await writer.batch()
        assert await asyncio.to_thread(kafka3.leader, topic, 0) != victim
        restart_mark = writer.seq
        restart = asyncio.create_task(asyncio.to_thread(kafka3.start_node, victim))
        while not restart.done():
            await writer.batch()  # keep writing while the node starts and catches up
        await restart
        await asyncio.to_thread(kafka3.wait_in_sync, [topic])
        for _ in range(4):
            await writer.batch()
        done_writing.set()
        await asyncio.wait_for(asyncio.shield(consuming), 60)
    finally:
        consuming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consuming
        await consumer.stop()
        await writer.producer.stop()
        if not kafka3.nodes[victim].running:
            await asyncio.to_thread(kafka3.start_node, victim)
    ends = await _end_offsets(kafka3.bootstrap, topic, parts)
    print(f"\n{len(writer.acked)} records acknowledged, {writer.seq - restart_mark} during the restart; "
          f"partition 0 failed over {failover_s:.1f}s after the SIGKILL")  # fmt: skip
    assert writer.failed == []
    assert sum(ends.values()) == len(writer.acked) == writer.seq  # nothing lost, nothing written twice
    assert {v: (p, o) for p, o, v in seen} == writer.acked  # each consumed at its acknowledged offset
    assert consumed_since(kill_mark, 0) >= 200 and consumed_since(restart_mark, 0) > 0
    assert kafka3.nodes[victim].port == victim_port and kafka3.nodes[victim].pid != victim_pid


async def test_rolling_restart_under_writes_loses_nothing(kafka3: LocalKafkaCluster, layout: TopicLayout) -> None:
    """Each node in turn SIGTERMed (controlled shutdown) and started again on its ports and data,
    the next one only once every replica is back in sync, while records are being written."""
    await ensure_topics(kafka3.bootstrap, layout)
    topic, parts = layout.results, layout.result_partitions
    before = [(n.port, n.controller_port, n.pid) for n in kafka3.nodes]
    writer = _Writer(kafka3.bootstrap, topic, parts)
    await writer.producer.start()
    try:
        rolling = asyncio.create_task(asyncio.to_thread(kafka3.rolling_restart))  # waits on every topic's ISR
        while not rolling.done():
            await writer.batch()
        await rolling
        await writer.batch()
    finally:
        await writer.producer.stop()
    rss = ", ".join(f"{r / 2**20:.0f}" for r in kafka3.rss_bytes() if r)
    print(f"\n{len(writer.acked)} records acknowledged during a rolling restart; RSS MiB after: {rss}")
    assert writer.failed == []
    got = await _consume_all(kafka3.bootstrap, topic, len(writer.acked))
    assert sorted(got) == sorted(writer.acked) and len(got) == writer.seq
    assert [(n.port, n.controller_port) for n in kafka3.nodes] == [b[:2] for b in before]
    assert not {n.pid for n in kafka3.nodes} & {b[2] for b in before}


async def test_transactions_on_three_brokers_read_committed_sees_committed_only(
    kafka3: LocalKafkaCluster, layout: TopicLayout
) -> None:
    await ensure_topics(kafka3.bootstrap, layout)
    producer = AIOKafkaProducer(bootstrap_servers=kafka3.bootstrap, transactional_id=f"tx-{uuid.uuid4()}")
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
    assert await _consume_all(kafka3.bootstrap, layout.dlq, 2, isolation_level="read_committed") == [
        b"committed", b"after"]  # fmt: skip
    assert await _consume_all(kafka3.bootstrap, layout.dlq, 3, isolation_level="read_uncommitted") == [
        b"committed", b"aborted", b"after"]  # fmt: skip
    state = (await asyncio.to_thread(kafka3.metadata, ["__transaction_state"])).topics["__transaction_state"]
    assert state and all(len(p.replicas) == 3 for p in state.values())


async def _end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    finally:
        await consumer.stop()
    return {tp.partition: off for tp, off in ends.items()}
