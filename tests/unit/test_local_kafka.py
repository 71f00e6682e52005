"""Local Kafka launcher details that need no broker."""

from __future__ import annotations


def test_kafka_cluster_ids_never_look_like_options() -> None:
    from broker.local_kafka import new_cluster_id

    ids = [new_cluster_id() for _ in range(5000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
