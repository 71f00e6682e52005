"""At-least-once bookkeeping: when a fetched record is done, and committing what is done.

A record is done when *all* its outputs are acknowledged by Kafka (`publish`); the
`OffsetTracker` (signer/offsets.py) moves a partition's commit position only past a contiguous
run of done records, so records finishing out of order - batches overlap, enclaves differ,
admin operations run on their own task - never commit past an unfinished one. The commit loop
commits what moved every SIGNER_COMMIT_INTERVAL_MS. A failed write fails `publish`, and with it
the host: nothing uncommitted is lost.

Outputs are written as record batches (`RecordBatches`): the outputs of concurrent calls share a
topic's open batch, which is closed and handed to the producer whole as soon as a partition is
free to take it (no linger): one future per batch rather than a future, a partitioner call and a
callback per record. The records of a call are done together, when every batch holding one of its
outputs is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError
from aiokafka.structs import OffsetAndMetadata

from .intake import Output, Records
from .metrics import HostMetrics
from .offsets import OffsetTracker

log = structlog.get_logger("host")


class _Call:
    """One write(): done when every batch holding one of its outputs is acknowledged."""

    __slots__ = ("future", "remaining")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.remaining = 1  # the call's own token, given back once all its outputs are in batches


class RecordBatches:
    """Writes outputs as whole record batches, one future per batch.

    Outputs of every concurrent write() for a topic go into that topic's open batch; *lanes*, one
    per partition at most, each take the oldest batch, close it and hand it to the producer for
    their partition, so a batch is sent as soon as a lane is free (no linger) and grows while the
    lanes are busy. A producer holds one batch per partition until the one before it is sent, so
    a lane waits there, and keeps waiting while the broker is slow to acknowledge (the idempotent
    producer's own retries decide when a write has failed). A record keeps its key (a result's is
    its request id), but its partition is its batch's, not a hash of the key: results are spread
    over the topic's partitions, and a result redone after a crash may land on another one."""

    PARTITIONS_TTL_S = 60.0  # partitions are looked up again this often (a topic may have grown)

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._queues: dict[str, deque[tuple[Any, list[_Call]]]] = {}  # topic -> batches not yet handed over
        self._busy: dict[str, set[int]] = {}  # topic -> partitions with a lane
        self._partitions: dict[str, tuple[float, list[int]]] = {}
        self._turn = itertools.count()
        self._lanes: set[asyncio.Task[None]] = set()

    async def write(self, outputs: Sequence[Output]) -> None:
        """Return once every output is acknowledged by the broker; raise if a write fails."""
        if not outputs:
            return
        by_topic: dict[str, list[Output]] = {}
        for o in outputs:
            by_topic.setdefault(o.topic, []).append(o)
        partitions = {topic: await self._partitions_for(topic) for topic in by_topic}
        call = _Call()
        for topic, outs in by_topic.items():  # no await from here on: no other write interleaves
            queue = self._queues.setdefault(topic, deque())
            for o in outs:
                if not queue or queue[-1][0].closed():
                    queue.append((self.producer.create_batch(), []))
                batch, calls = queue[-1]
                if batch.append(key=o.key, value=o.value, timestamp=None) is None:  # full (and now closed)
                    queue.append((self.producer.create_batch(), []))
                    batch, calls = queue[-1]
                    if batch.append(key=o.key, value=o.value, timestamp=None) is None:
                        raise ValueError(f"an output of {len(o.value)} bytes does not fit in a record batch")
                if not calls or calls[-1] is not call:
                    calls.append(call)
                    call.remaining += 1
            self._start_lanes(topic, partitions[topic])
        self._settle(call)  # its token
        await call.future

    async def _partitions_for(self, topic: str) -> list[int]:
        loop = asyncio.get_running_loop()
        known = self._partitions.get(topic)
        if known is None or loop.time() - known[0] > self.PARTITIONS_TTL_S:
            known = self._partitions[topic] = (loop.time(), sorted(await self.producer.partitions_for(topic)))
        return known[1]

    def _start_lanes(self, topic: str, partitions: list[int]) -> None:
        busy = self._busy.setdefault(topic, set())
        queue = self._queues[topic]
        free = [p for p in partitions if p not in busy]
        while free and len(queue) > len(partitions) - len(free):  # a lane per batch waiting, one per partition
            partition = free.pop(next(self._turn) % len(free))
            busy.add(partition)
            lane = asyncio.create_task(self._lane(topic, partition), name=f"results {topic}[{partition}]")
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)

    async def _lane(self, topic: str, partition: int) -> None:
        queue = self._queues[topic]
        try:
            while queue:
                batch, calls = queue.popleft()
                batch.close()  # complete: the producer sends it without lingering for more
                try:
                    while True:
                        try:
                            ack = await self.producer.send_batch(batch, topic, partition=partition)
                            break
                        except KafkaTimeoutError:  # the partition's previous batch is still unsent: wait on
                            continue
                except asyncio.CancelledError:
                    self._fail(calls, KafkaError("the host stopped before a record batch was handed over"))
                    raise
                except Exception as exc:  # the producer failed or closed: the writers see it, and stop
                    self._fail(calls, exc)
                    continue
                ack.add_done_callback(functools.partial(self._acknowledged, calls))
        finally:
            self._busy[topic].discard(partition)

    def _acknowledged(self, calls: list[_Call], ack: asyncio.Future[Any]) -> None:
        if ack.cancelled():
            self._fail(calls, KafkaError("a record batch was cancelled"))
        elif (exc := ack.exception()) is not None:
            self._fail(calls, exc)
        else:
            for call in calls:
                self._settle(call)

    @staticmethod
    def _settle(call: _Call) -> None:
        call.remaining -= 1
        if call.remaining == 0 and not call.future.done():
            call.future.set_result(None)

    @staticmethod
    def _fail(calls: list[_Call], exc: BaseException) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(exc)


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

    async def publish(self, writer: RecordBatches, outputs: list[Output]) -> None:
        """Publish outputs; their input records are done once every output is acknowledged. Raises
        if a write fails (then nothing of it is committed)."""
        await writer.write(outputs)  # a failed write raises here, and nothing below runs
        done = self.tracker.done
        for o in outputs:  # a record with two outputs (a poison result and its DLQ record) is done once
            done(o.source, o.offset)
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
