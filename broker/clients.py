"""Kafka producer and consumer factories with the cluster's safe defaults.

These return plain aiokafka objects: callers use aiokafka's own idioms
(getmany, pause/resume, send_offsets_to_transaction) directly.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


def result_producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    """Idempotent producer, acks=all: a result acknowledged is a result durably written."""
    opts: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        client_id="signer-host",
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        max_batch_size=256 * 1024,
        request_timeout_ms=30_000,
    )
    opts.update(overrides)
    return AIOKafkaProducer(**opts)


def request_consumer(
    bootstrap: str, *topics: str, group_id: str = "signer-hosts", **overrides: Any
) -> AIOKafkaConsumer:
    """Group consumer with manual commits; offsets are committed only after results are durable."""
    opts: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        client_id="signer-host",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=1024 * 1024,
        fetch_max_bytes=8 * 1024 * 1024,  # bounds the fetcher's buffer, whatever the backlog
        fetch_max_wait_ms=50,
    )
    opts.update(overrides)
    return AIOKafkaConsumer(*topics, **opts)
