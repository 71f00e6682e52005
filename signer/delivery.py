"""The two run modes: how fetched records become published outputs and committed offsets.

At-least-once (default), pipelined: the fetch loop keeps fetching while earlier batches are
signed (one task per fetched batch of sign requests; admin records go to the admin lane).
Outputs are published with the idempotent acks=all producer, and a partition's offsets are
committed only past records whose outputs are all acknowledged (signer/commits.py). A crash
redelivers what was not committed; signing is deterministic, so a redone result carries the
same bytes.

Exactly-once (SIGNER_EXACTLY_ONCE=true): each fetched batch of sign requests is one Kafka
transaction - its outputs and its input offsets (send_offsets_to_transaction) - processed one
batch at a time; each admin reply is a transaction of its own with its record's offset, so a
slow admin operation holds up neither. A read_committed consumer sees each output once.

Both modes pause and resume partitions around SIGNER_MAX_IN_FLIGHT (signer/backpressure.py) and
hand revoked partitions over without loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from .admin import AdminLane
from .backpressure import Backpressure
from .commits import Commits, RecordBatches, lag_loop
from .config import HostConfig
from .intake import Intake, Output, Record, Records
from .metrics import HostMetrics

log = structlog.get_logger("host")


class RunMode(ConsumerRebalanceListener):
    """What both modes share: fetch, split off admin records, backpressure, rebalance callbacks."""

    def __init__(
        self, config: HostConfig, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
        intake: Intake, admin: AdminLane, metrics: HostMetrics,
    ) -> None:  # fmt: skip
        self.config = config
        self.consumer = consumer
        self.producer = producer
        self.intake = intake
        self.admin = admin
        self.metrics = metrics
        self.writer = RecordBatches(producer)
        self.backpressure = Backpressure(consumer, config.max_in_flight, config.resume_below, metrics)

    @property
    def in_flight(self) -> int:
        raise NotImplementedError

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until `stopping` is set, then finish what was fetched."""
        raise NotImplementedError

    async def last_commit(self) -> None:
        """After run() (also a cancelled one): commit whatever is done."""

    def start_helpers(
        self, tg: asyncio.TaskGroup, committed: Callable[[TopicPartition], int | None]
    ) -> list[asyncio.Task[None]]:
        """The tasks beside the fetch loop: consumer lag (`committed`: what this host knows it committed),
        the admin lane, and the watch on the enclave pool (a failed pool fails the host)."""
        return [
            tg.create_task(lag_loop(self.consumer, self.metrics, committed), name="lag-loop"),
            tg.create_task(self.admin.run(self._deliver_admin), name="admin-lane"),
            tg.create_task(self.intake.backend.pool.watch(), name="pool-watch"),
        ]

    async def _deliver_admin(self, rec: Record, reply: Output) -> None:
        raise NotImplementedError

    async def fetch(self) -> Records:
        room = self.backpressure.room(self.in_flight)
        return await self.consumer.getmany(timeout_ms=100, max_records=min(self.config.max_batch, room))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.backpressure.assigned(list(assigned))
        log.info("partitions_assigned", partitions=len(assigned))


class AtLeastOnce(RunMode):
    def __init__(
        self, config: HostConfig, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
        intake: Intake, admin: AdminLane, metrics: HostMetrics,
    ) -> None:  # fmt: skip
        super().__init__(config, consumer, producer, intake, admin, metrics)
        self.commits = Commits(consumer, metrics, config.commit_interval_s)

    @property
    def in_flight(self) -> int:
        """Records fetched and not done - or, if more, requests still in the enclave pool: a rebalance
        forgets a revoked partition's unfinished records, but not their requests already handed to the
        pool, and the partition's next owner (this host again, perhaps) fetches them anew."""
        return max(self.commits.in_flight, self.intake.backend.outstanding)

    async def run(self, stopping: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            committer = tg.create_task(self.commits.commit_loop(stopping), name="commit-loop")
            helpers = self.start_helpers(tg, self.commits.tracker.committed)
            while not stopping.is_set():
                batch = await self.fetch()
                if not batch:
                    continue
                self.commits.fetched(batch)
                requests, admin = self.intake.split(batch)
                self.admin.put(admin)
                if requests:
                    tg.create_task(self._sign(requests, time.perf_counter()))
            # stopping: no more fetches; everything in flight (admin records too) finishes, then the last commit
            await self.commits.wait_drained()
            self.commits.commit_now()
            await committer
            for task in helpers:
                task.cancel()
        # the commit loop may have been mid-commit with older offsets when it was told to stop:
        # commit once more, now that everything fetched is done
        await self.commits.commit()

    async def _sign(self, requests: Records, fetched_at: float) -> None:
        outputs = await self.intake.outputs(requests, fetched_at)
        t0 = time.perf_counter()
        await self.commits.publish(self.writer, outputs)  # a failed write fails the host: nothing is committed
        self.metrics.stage.observe("result_publish", time.perf_counter() - t0)

    async def _deliver_admin(self, rec: Record, reply: Output) -> None:
        await self.commits.publish(self.writer, [reply])  # the record is done once its reply is acknowledged

    async def last_commit(self) -> None:
        with contextlib.suppress(KafkaError, asyncio.CancelledError):
            await self.commits.commit()

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Finish the revoked partitions' records in flight (up to SIGNER_REBALANCE_DRAIN_S), commit them,
        and leave the rest - admin records not yet started included - to the next owner."""
        revoked = list(revoked)
        drained = await self.commits.wait_drained(revoked, timeout=self.config.rebalance_drain_s)
        with contextlib.suppress(KafkaError):
            await self.commits.commit(revoked)
        self.commits.forget(revoked)
        self.admin.drop(revoked)
        log.info("partitions_revoked", partitions=len(revoked), drained=drained)


class ExactlyOnce(RunMode):
    def __init__(
        self, config: HostConfig, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
        intake: Intake, admin: AdminLane, metrics: HostMetrics,
    ) -> None:  # fmt: skip
        super().__init__(config, consumer, producer, intake, admin, metrics)
        self._transaction = asyncio.Lock()  # one transaction at a time on the transactional producer

    @property
    def in_flight(self) -> int:
        return self.admin.pending  # sign requests are done before the next fetch

    async def run(self, stopping: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            helpers = self.start_helpers(tg, lambda tp: None)
            while not stopping.is_set():
                batch = await self.fetch()
                if not batch:
                    continue
                requests, admin = self.intake.split(batch)
                self.admin.put(admin)
                if requests:
                    await self._sign(requests)
            await self.admin.settled()  # every admin record fetched is replied to and committed
            for task in helpers:
                task.cancel()

    async def _sign(self, requests: Records) -> None:
        async with self._transaction:
            outputs = await self.intake.outputs(requests, time.perf_counter())
            t0 = time.perf_counter()
            offsets = {tp: OffsetAndMetadata(recs[-1].offset + 1, "") for tp, recs in requests.items()}
            await self._commit(outputs, offsets)
            self.metrics.stage.observe("result_publish", time.perf_counter() - t0)

    async def _deliver_admin(self, rec: Record, reply: Output) -> None:
        async with self._transaction:
            offset = {TopicPartition(rec.topic, rec.partition): OffsetAndMetadata(rec.offset + 1, "")}
            await self._commit([reply], offset)

    async def _commit(self, outputs: list[Output], offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """One transaction: these outputs and these input offsets, or nothing."""
        async with self.producer.transaction():
            await self.writer.write(outputs)  # acknowledged before the transaction commits
            await self.producer.send_offsets_to_transaction(offsets, self.config.group_id)

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """The transaction in hand completes (or aborts) first; queued admin records of the revoked
        partitions are the next owner's, and one being handled is finished and committed."""
        revoked = list(revoked)
        async with self._transaction:
            pass
        dropped = self.admin.drop(revoked)
        await self.admin.settled(revoked)
        log.info("partitions_revoked", partitions=len(revoked), admin_dropped=dropped)
