"""At-least-once bookkeeping: when a fetched record is done, and committing what is done.

A record is done when *all* its outputs are acknowledged by Kafka (`publish`); the
`OffsetTracker` (signer/offsets.py) moves a partition's commit position only past a contiguous
run of done records, so records finishing out of order - batches overlap, enclaves differ,
admin operations run on their own task - never commit past an unfinished one. The commit loop
commits what moved every SIGNER_COMMIT_INTERVAL_MS. A failed write fails `publish`, and with it
the host: nothing uncommitted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from .intake import Output, Records
from .metrics import HostMetrics
from .offsets import OffsetTracker

log = structlog.get_logger("host")


class Commits:
    def __init__(self, consumer: AIOKafkaConsumer, metrics: HostMetrics, interval_s: float) -> None:
        self.consumer = consumer
        self.metrics = metrics
        self.interval_s = interval_s
        self.tracker = OffsetTracker()
        self._commit_now = asyncio.Event()
        self._drained = asyncio.Event()

    @property
    def in_flight(self) -> int:
        """Records fetched and not yet done."""
        return self.tracker.in_flight

    def fetched(self, batch: Records) -> None:
        for tp, records in batch.items():
            self.tracker.add(tp, [r.offset for r in records])
        self.metrics.in_flight.set(self.tracker.in_flight)

    async def publish(self, producer: AIOKafkaProducer, outputs: list[Output]) -> None:
        """Publish outputs; each input record is done once all its outputs are acknowledged. Raises
        if a write fails (then nothing of it is committed)."""
        unwritten = Counter((o.source, o.offset) for o in outputs)
        acks = []
        for o in outputs:
            ack = await producer.send(o.topic, o.value, key=o.key)
            ack.add_done_callback(functools.partial(self._written, unwritten, o.source, o.offset))
            acks.append(ack)
        await asyncio.gather(*acks)

    def _written(
        self, unwritten: Counter[tuple[TopicPartition, int]], tp: TopicPartition, offset: int, fut: asyncio.Future[Any]
    ) -> None:
        if not fut.cancelled() and fut.exception() is None:
            unwritten[(tp, offset)] -= 1
            if unwritten[(tp, offset)] == 0:
                self.tracker.done(tp, offset)
                if self.tracker.in_flight == 0:
                    self._drained.set()
        self.metrics.in_flight.set(self.tracker.in_flight)

    # -- committing ------------------------------------------------------------------------------

    async def commit(self, tps: list[TopicPartition] | None = None) -> None:
        """Commit the positions that moved (on these partitions, or all)."""
        offsets = self.tracker.committable(tps)
        if not offsets:
            return
        try:
            await self.consumer.commit({tp: OffsetAndMetadata(off, "") for tp, off in offsets.items()})
            self.tracker.mark_committed(offsets)
        except CommitFailedError as exc:  # a rebalance is under way: the revoke handler commits what it can
            log.warning("commit_deferred", reason=str(exc)[:200])

    async def commit_loop(self, stopping: asyncio.Event) -> None:
        """Commit every interval; after `commit_now()` while stopping, commit once more and return."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._commit_now.wait()
            await self.commit()
            if self._commit_now.is_set() and stopping.is_set():
                return

    def commit_now(self) -> None:
        self._commit_now.set()

    async def wait_drained(self, tps: list[TopicPartition] | None = None, timeout: float | None = None) -> bool:
        """Wait until every fetched record (of these partitions, or all) is done; False on timeout."""

        async def drained() -> None:
            while self.tracker.pending(tps) > 0:
                self._drained.clear()
                if tps is None:
                    await self._drained.wait()
                else:
                    await asyncio.sleep(0.01)  # per-partition drains are rare (rebalances)

        try:
            async with asyncio.timeout(timeout):
                await drained()
            return True
        except TimeoutError:
            return False

    def forget(self, tps: list[TopicPartition]) -> None:
        """Partitions revoked: their unfinished records belong to the next owner."""
        self.tracker.forget(tps)
        if self.tracker.in_flight == 0:
            self._drained.set()
        self.metrics.in_flight.set(self.tracker.in_flight)


async def lag_loop(
    consumer: AIOKafkaConsumer, metrics: HostMetrics, committed: Callable[[TopicPartition], int | None]
) -> None:
    """Consumer lag per topic, every second: log end minus committed position over assigned partitions
    (`committed` is what this host knows it committed; otherwise the group's committed offset is asked)."""
    while True:
        await asyncio.sleep(1.0)
        per_topic: dict[str, int] = {}
        for tp in list(consumer.assignment()):  # a rebalance may change the assignment during an await
            if tp not in consumer.assignment():
                continue
            end = consumer.highwater(tp)  # no await since the check above: still assigned
            if end is None:
                continue
            done = committed(tp)
            if done is None:
                with contextlib.suppress(KafkaError, AssertionError):
                    done = await consumer.committed(tp)
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + max(0, end - (done or 0))
        for topic, lag in per_topic.items():
            metrics.consumer_lag.labels(topic).set(lag)
