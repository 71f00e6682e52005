"""The topic layout of the signer cluster and its idempotent creation.

Replication follows the cluster: min(3, brokers) replicas per partition and, with three replicas,
min.insync.replicas=2 (an acks=all write survives one broker down). On a single broker the topics
are created exactly as before: one replica, the broker's own min.insync.replicas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError


@dataclass(frozen=True)
class TopicLayout:
    """Topic names (WIRE.md defaults) and partition counts."""

    requests: str = "sign.requests"
    results: str = "sign.results"
    dlq: str = "sign.dlq"
    # key management requests (keys create ...) and their replies
    admin: str = "sign.admin"
    admin_replies: str = "sign.admin.replies"
    request_partitions: int = 12
    result_partitions: int = 12
    # None: min(3, the number of brokers in the cluster the topics are created on)
    replication_factor: int | None = None

    def new_topics(self, brokers: int = 1) -> list[NewTopic]:
        """The topics, for a cluster of `brokers` brokers (unless replication_factor is set)."""
        rf = self.replication_factor or replication_factor_for(brokers)
        configs = topic_configs(rf)
        return [
            NewTopic(self.requests, self.request_partitions, rf, topic_configs=configs),
            NewTopic(self.results, self.result_partitions, rf, topic_configs=configs),
            NewTopic(self.dlq, 3, rf, topic_configs=configs),
            NewTopic(self.admin, 1, rf, topic_configs=configs),
            NewTopic(self.admin_replies, 1, rf, topic_configs=configs),
        ]


def replication_factor_for(brokers: int) -> int:
    return max(1, min(3, brokers))


def topic_configs(replication_factor: int) -> dict[str, str]:
    """min.insync.replicas=2 with three or more replicas; otherwise the broker's default."""
    return {"min.insync.replicas": "2"} if replication_factor >= 3 else {}


async def ensure_topics(bootstrap: str, layout: TopicLayout, timeout: float = 60.0, brokers: int | None = None) -> None:
    """Create the layout's topics that do not exist yet; retry while the broker settles.

    Their replication factor is the layout's, else min(3, `brokers`), else min(3, the number of
    brokers the cluster's metadata lists): a cluster still forming may list fewer, so pass
    `brokers` (or set the layout's replication_factor) where that can happen."""
    fixed = layout.replication_factor is not None
    await _ensure(bootstrap, layout.new_topics, timeout, brokers if brokers is not None or not fixed else 1)


def keys_topic(
    name: str, brokers: int = 1, replication_factor: int | None = None, configs: Mapping[str, str] | None = None
) -> NewTopic:
    """The key store's topic (kafka:// key stores): one partition, so one order every host reads;
    compacted, so it keeps the last record per record key for ever (never deleted by age); replicated
    like the other topics. `configs` adds topic settings (tests shorten segments to force compaction)."""
    rf = replication_factor or replication_factor_for(brokers)
    return NewTopic(name, 1, rf, topic_configs={**topic_configs(rf), "cleanup.policy": "compact", **(configs or {})})


async def ensure_keys_topic(
    bootstrap: str, name: str, *, timeout: float = 60.0, brokers: int | None = None,
    replication_factor: int | None = None, configs: Mapping[str, str] | None = None,
) -> None:  # fmt: skip
    """Create the key store's topic if it does not exist yet (as ensure_topics does for the layout)."""
    count = brokers if brokers is not None or replication_factor is None else 1
    await _ensure(bootstrap, lambda n: [keys_topic(name, n, replication_factor, configs)], timeout, count)


async def _ensure(bootstrap: str, make: Callable[[int], list[NewTopic]], timeout: float, brokers: int | None) -> None:
    async with asyncio.timeout(timeout):
        while True:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="signer-topics")
            try:
                await admin.start()
                existing = set(await admin.list_topics())
                count = brokers
                if count is None:
                    count = len((await admin.describe_cluster())["brokers"])
                topics = make(count or 1)
                missing = [t for t in topics if t.name not in existing]
                if missing:
                    try:
                        await admin.create_topics(missing)
                    except TopicAlreadyExistsError:
                        pass  # a concurrent creator won; fine
                await _wait_for_leaders(admin, [t.name for t in topics])
                return
            except KafkaError:
                await asyncio.sleep(0.2)  # broker still electing; the enclosing timeout bounds this
            finally:
                await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    while True:
        described = await admin.describe_topics(names)
        ready = all(
            t.get("error_code", 0) == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
            for t in described
        )
        if ready:
            return
        await asyncio.sleep(0.1)
