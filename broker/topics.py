"""The topic layout of the signer cluster and its idempotent creation."""

from __future__ import annotations

import asyncio
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
    replication_factor: int = 1

    def new_topics(self) -> list[NewTopic]:
        rf = self.replication_factor
        return [
            NewTopic(self.requests, self.request_partitions, rf),
            NewTopic(self.results, self.result_partitions, rf),
            NewTopic(self.dlq, 3, rf),
            NewTopic(self.admin, 1, rf),
            NewTopic(self.admin_replies, 1, rf),
        ]


async def ensure_topics(bootstrap: str, layout: TopicLayout, timeout: float = 60.0) -> None:
    """Create the layout's topics that do not exist yet; retry while the broker settles."""
    async with asyncio.timeout(timeout):
        while True:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="signer-topics")
            try:
                await admin.start()
                existing = set(await admin.list_topics())
                missing = [t for t in layout.new_topics() if t.name not in existing]
                if missing:
                    try:
                        await admin.create_topics(missing)
                    except TopicAlreadyExistsError:
                        pass  # a concurrent creator won; fine
                await _wait_for_leaders(admin, [t.name for t in layout.new_topics()])
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
