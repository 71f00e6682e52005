"""Local Kafka launcher details that need no broker."""

from __future__ import annotations


def test_kafka_cluster_ids_never_look_like_options() -> None:
    from broker.local_kafka import new_cluster_id

    ids = [new_cluster_id() for _ in range(5000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


SINGLE_NODE_PROPERTIES = """process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:9093
listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093
advertised.listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=/d/kraft-logs
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
"""


def test_the_single_node_configuration_is_unchanged() -> None:
    from pathlib import Path

    from broker.local_kafka import LocalKafka

    kafka = LocalKafka(data_dir=Path("/d"), port=9092)
    kafka._controller_port = 9093
    assert kafka._server_properties() == SINGLE_NODE_PROPERTIES


def _props(nodes: int) -> dict[str, str]:
    from pathlib import Path

    from broker.kafka_cluster import LocalKafkaCluster

    cluster = LocalKafkaCluster(brokers=nodes)
    cluster.nodes = cluster._plan_nodes(Path("/d"))  # holds its ports: released below
    try:
        text = cluster._properties(cluster.nodes[-1])
    finally:
        for n in cluster.nodes:
            n.release_ports()
    return dict(line.split("=", 1) for line in text.splitlines())


def test_cluster_nodes_replicate_by_cluster_size() -> None:
    three, two = _props(3), _props(2)
    assert three["process.roles"] == "broker,controller" and three["node.id"] == "3"
    assert len(three["controller.quorum.voters"].split(",")) == 3 and "controller.quorum.bootstrap.servers" not in three
    for key in ("default.replication.factor", "offsets.topic.replication.factor",
                "transaction.state.log.replication.factor", "share.coordinator.state.topic.replication.factor"):  # fmt: skip
        assert three[key] == "3" and two[key] == "2"
    for key in ("min.insync.replicas", "transaction.state.log.min.isr", "share.coordinator.state.topic.min.isr"):
        assert three[key] == "2" and two[key] == "1"
    assert three["unclean.leader.election.enable"] == "false" and three["group.initial.rebalance.delay.ms"] == "0"
    assert int(three["broker.session.timeout.ms"]) > int(three["broker.heartbeat.interval.ms"])


def test_a_held_port_can_be_listened_on_by_kafka_but_not_taken_by_others() -> None:
    import socket

    import pytest

    from broker.kafka_cluster import reserve_port

    held = reserve_port("127.0.0.1")
    port = held.getsockname()[1]
    try:
        with socket.socket() as other:
            with pytest.raises(OSError):
                other.bind(("127.0.0.1", port))  # no SO_REUSEADDR: refused while held
        with socket.socket() as jvm_like:  # Kafka's listeners bind with SO_REUSEADDR
            jvm_like.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            jvm_like.bind(("127.0.0.1", port))
            jvm_like.listen()
    finally:
        held.close()


def test_topics_replicate_by_cluster_size_and_are_unchanged_on_one_broker() -> None:
    from dataclasses import replace

    from broker.topics import TopicLayout

    layout = TopicLayout()
    assert layout.replication_factor is None
    one = layout.new_topics()
    assert {t.replication_factor for t in one} == {1} and all(t.topic_configs == {} for t in one)
    assert [(t.name, t.num_partitions) for t in one] == [
        ("sign.requests", 12), ("sign.results", 12), ("sign.dlq", 3), ("sign.admin", 1), ("sign.admin.replies", 1)]  # fmt: skip
    min_isr_2 = {"min.insync.replicas": "2"}
    for brokers, rf, configs in ((2, 2, {}), (3, 3, min_isr_2), (5, 3, min_isr_2)):
        topics = layout.new_topics(brokers)
        assert {t.replication_factor for t in topics} == {rf} and all(t.topic_configs == configs for t in topics)
    pinned = replace(layout, replication_factor=1).new_topics(3)
    assert {t.replication_factor for t in pinned} == {1} and all(t.topic_configs == {} for t in pinned)


def test_metadata_v1_response_is_decoded() -> None:
    import struct

    from broker.local_kafka import PartitionState, parse_metadata_v1

    def s(text: str) -> bytes:
        return struct.pack(">h", len(text)) + text.encode()

    resp = struct.pack(">ii", 11, 2)
    resp += struct.pack(">i", 1) + s("127.0.0.1") + struct.pack(">i", 9092) + struct.pack(">h", -1)
    resp += struct.pack(">i", 2) + s("127.0.0.1") + struct.pack(">i", 9094) + s("rack-b")
    resp += struct.pack(">i", 2)  # controller id
    resp += struct.pack(">i", 2)  # topics
    resp += struct.pack(">h", 0) + s("t") + b"\x00" + struct.pack(">i", 1)
    resp += struct.pack(">hii", 0, 0, 2) + struct.pack(">iii", 2, 2, 1) + struct.pack(">ii", 1, 2)
    resp += struct.pack(">h", 3) + s("missing") + b"\x00" + struct.pack(">i", 0)  # UNKNOWN_TOPIC_OR_PARTITION
    md = parse_metadata_v1(resp, correlation_id=11)
    assert md.brokers == {1: ("127.0.0.1", 9092), 2: ("127.0.0.1", 9094)} and md.controller_id == 2
    assert md.topics == {"t": {0: PartitionState(leader=2, replicas=(2, 1), isr=(2,))}}


def test_describe_quorum_v0_response_is_decoded() -> None:
    import struct

    from broker.local_kafka import QuorumState, parse_describe_quorum_v0

    topic = b"__cluster_metadata"
    resp = struct.pack(">i", 13) + b"\x00" + struct.pack(">h", 0)
    resp += b"\x02" + bytes([len(topic) + 1]) + topic + b"\x02"
    resp += struct.pack(">ihiiq", 0, 0, 2, 5, 100)
    resp += b"\x04" + b"".join(struct.pack(">iq", i, 100) + b"\x00" for i in (1, 2, 3))
    resp += b"\x01" + b"\x00" + b"\x00" + b"\x00"  # no observers; tagged fields of partition, topic, body
    assert parse_describe_quorum_v0(resp, correlation_id=13) == QuorumState(2, 5, (1, 2, 3), ())
    error = struct.pack(">i", 13) + b"\x00" + struct.pack(">h", 15) + b"\x01\x00"
    assert parse_describe_quorum_v0(error, correlation_id=13) is None
