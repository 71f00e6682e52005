"""The host worker: Kafka in, enclave pool, results out, offsets committed only after results are durable.

At-least-once (default), pipelined: the fetch loop keeps fetching while earlier
batches are signed; each record's outputs (a result, a DLQ record or an admin
reply; a poison request gets both its result and a DLQ record) are published
with the idempotent acks=all producer, and the OffsetTracker lets a partition's
commit position move only past a contiguous run of records whose outputs are
all acknowledged. A crash re-delivers what was not committed; signing
is deterministic, so a redone result carries the same bytes.

Exactly-once (SIGNER_EXACTLY_ONCE=true): each fetched batch is one Kafka
transaction - its outputs and its input offsets (send_offsets_to_transaction) -
so a read_committed consumer sees each request's result once, across crashes.

Backpressure: records in flight are bounded (SIGNER_MAX_IN_FLIGHT); at the
bound the host pauses its partitions and resumes them below SIGNER_RESUME_BELOW,
so memory stays bounded however far producers run ahead of the enclaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import msgpack
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from broker.clients import request_consumer, result_producer
from schemas.admin import decode_admin_request
from schemas.dlq import DlqRecord
from schemas.errors import SchemaError
from schemas.refusals import Code
from schemas.sign_request import SignRequest, decode_sign_request
from schemas.sign_result import SignResult

from .backend import EnclaveBackend
from .config import HostConfig
from .credentials import kms_credentials
from .keys import KeyOpError
from .keystore import DirectoryKeyStore
from .metrics import EnclaveStatsCollector, HostMetrics
from .offsets import OffsetTracker

log = structlog.get_logger("host")

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
# an output for an input record (one each, two for a poison request): (topic, key, value, source partition, offset)
Output = tuple[str, bytes | None, bytes, TopicPartition, int]


class HostWorker:
    def __init__(self, config: HostConfig, metrics: HostMetrics | None = None) -> None:
        if not config.enclaves:
            raise ValueError("no enclave channel configured (SIGNER_ENCLAVES)")
        if not config.keystore_dir:
            raise ValueError("no key store configured (SIGNER_KEYSTORE_DIR)")
        self.config = config
        self.metrics = metrics or HostMetrics()
        self.backend = EnclaveBackend(
            config.enclaves, DirectoryKeyStore(Path(config.keystore_dir)), config.pool, self.metrics,
            default_keyring=config.default_keyring,
            credentials=functools.partial(kms_credentials, config.kms_credentials_file),
        )  # fmt: skip
        EnclaveStatsCollector(self.backend.enclave_stats, self.metrics.registry)
        self.tracker = OffsetTracker()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self._commit_now = asyncio.Event()
        self._drained = asyncio.Event()
        self._batch_lock = asyncio.Lock()  # exactly-once: the transaction in hand
        self._paused = False
        self.kafka_ready = False

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        await self.backend.start()
        try:
            async with asyncio.timeout(cfg.enclave_wait_s):
                await self.backend.wait_ready()
        except TimeoutError:
            log.warning("no_enclave_yet", waited_s=cfg.enclave_wait_s, enclaves=cfg.enclaves)
        if cfg.exactly_once:
            self.producer = result_producer(
                cfg.bootstrap,
                transactional_id=cfg.transactional_id,
                transaction_timeout_ms=cfg.transaction_timeout_ms,
            )
        else:
            self.producer = result_producer(cfg.bootstrap)
        await self.producer.start()
        self.consumer = request_consumer(
            cfg.bootstrap, group_id=cfg.group_id, session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=max(500, cfg.session_timeout_ms // 5),
        )  # fmt: skip
        self.consumer.subscribe([cfg.layout.requests, cfg.layout.admin], listener=_Rebalance(self))
        await self.consumer.start()
        self.kafka_ready = True
        log.info("host_started", mode="exactly_once" if cfg.exactly_once else "at_least_once",
                 group=cfg.group_id, max_in_flight=cfg.max_in_flight)  # fmt: skip

    async def run(self) -> None:
        """Consume until stop(); then finish what is in flight, commit, and leave the group."""
        try:
            if self.config.exactly_once:
                await self._run_transactional()
            else:
                await self._run_pipelined()
        finally:
            if not self.config.exactly_once and self.consumer is not None:
                # also on a cancelled (timed-out) shutdown: whatever is done need not be redone
                with contextlib.suppress(KafkaError, asyncio.CancelledError):
                    await self._commit()
            await self._close()

    def stop(self) -> None:
        self._stopping.set()

    async def stop_within(self, run: asyncio.Task[None], timeout: float) -> None:
        """Graceful stop: stop fetching, finish in-flight work, publish, commit; past the timeout, cancel.

        Cancelling loses nothing: uncommitted requests are redelivered to the next
        owner of their partitions, and signing them again yields the same bytes.
        """
        self.stop()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(run)
        except TimeoutError:
            log.warning("shutdown_timeout", timeout_s=timeout, in_flight=self.tracker.in_flight)
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

    async def _close(self) -> None:
        self.kafka_ready = False
        if self.consumer is not None:
            with contextlib.suppress(KafkaError):
                await self.consumer.stop()  # leaves the group
        if self.producer is not None:
            with contextlib.suppress(KafkaError):
                await self.producer.stop()  # flushes
        await self.backend.close()
        self.metrics.enclaves_connected.set(0)

    # -- at-least-once, pipelined -----------------------------------------------------------------------

    async def _run_pipelined(self) -> None:
        assert self.consumer is not None
        async with asyncio.TaskGroup() as tg:
            committer = tg.create_task(self._commit_loop(), name="commit-loop")
            lag = tg.create_task(self._lag_loop(), name="lag-loop")
            while not self._stopping.is_set():
                room = await self._backpressure()
                batch = await self.consumer.getmany(timeout_ms=100, max_records=min(self.config.max_batch, room))
                if not batch:
                    continue
                for tp, records in batch.items():
                    self.tracker.add(tp, [r.offset for r in records])
                self.metrics.in_flight.set(self.tracker.in_flight)
                tg.create_task(self._process_pipelined(batch, time.perf_counter()))
            # stopping: no more fetches; everything in flight finishes, then the last commit
            await self._wait_drained()
            self._commit_now.set()
            await committer
            lag.cancel()
        # the commit loop may have been mid-commit with older offsets when it was told to stop:
        # commit once more, now that everything fetched is done
        await self._commit()

    async def _backpressure(self) -> int:
        """Pause or resume partitions around the watermarks; return how many records may be fetched."""
        assert self.consumer is not None
        cfg = self.config
        in_flight = self.tracker.in_flight
        if not self._paused and in_flight >= cfg.max_in_flight:
            self._paused = True
            self.consumer.pause(*self.consumer.assignment())
            self.metrics.paused_partitions.set(len(self.consumer.paused()))
            log.info("partitions_paused", in_flight=in_flight, partitions=len(self.consumer.paused()))
        elif self._paused and in_flight <= cfg.resume_below:
            self._paused = False
            self.consumer.resume(*self.consumer.paused())
            self.metrics.paused_partitions.set(0)
            log.info("partitions_resumed", in_flight=in_flight)
        return max(1, cfg.max_in_flight - in_flight)

    async def _process_pipelined(self, batch: Records, fetched_at: float) -> None:
        assert self.producer is not None
        outputs = await self._outputs(batch, fetched_at)
        t0 = time.perf_counter()
        unwritten: dict[tuple[TopicPartition, int], int] = {}  # a record is done when all its outputs are
        for _topic, _key, _value, tp, offset in outputs:
            unwritten[(tp, offset)] = unwritten.get((tp, offset), 0) + 1
        acks = []
        for topic, key, value, tp, offset in outputs:
            ack = await self.producer.send(topic, value, key=key)
            ack.add_done_callback(lambda f, tp=tp, offset=offset: self._output_written(f, tp, offset, unwritten))
            acks.append(ack)
        await asyncio.gather(*acks)  # a failed write fails this task, and with it the host: nothing is committed
        self.metrics.stage.observe("result_publish", time.perf_counter() - t0)

    def _output_written(
        self,
        fut: asyncio.Future[Any],
        tp: TopicPartition,
        offset: int,
        unwritten: dict[tuple[TopicPartition, int], int],
    ) -> None:
        if not fut.cancelled() and fut.exception() is None:
            left = unwritten[(tp, offset)] - 1
            unwritten[(tp, offset)] = left
            if left == 0:
                self.tracker.done(tp, offset)
                if self.tracker.in_flight == 0:
                    self._drained.set()
        self.metrics.in_flight.set(self.tracker.in_flight)

    async def _commit_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.commit_interval_s):
                    await self._commit_now.wait()
            await self._commit()
            if self._commit_now.is_set() and self._stopping.is_set():
                return

    async def _lag_loop(self) -> None:
        """Consumer lag per topic: log end minus committed position, over assigned partitions."""
        assert self.consumer is not None
        while True:
            await asyncio.sleep(1.0)
            per_topic: dict[str, int] = {}
            for tp in self.consumer.assignment():
                end = self.consumer.highwater(tp)
                if end is None:
                    continue
                done = self.tracker.committed(tp)
                if done is None:
                    with contextlib.suppress(KafkaError, AssertionError):
                        done = await self.consumer.committed(tp)
                per_topic[tp.topic] = per_topic.get(tp.topic, 0) + max(0, end - (done or 0))
            for topic, lag in per_topic.items():
                self.metrics.consumer_lag.labels(topic).set(lag)

    async def _commit(self, tps: list[TopicPartition] | None = None) -> None:
        assert self.consumer is not None
        offsets = self.tracker.committable(tps)
        if not offsets:
            return
        try:
            await self.consumer.commit({tp: OffsetAndMetadata(off, "") for tp, off in offsets.items()})
            self.tracker.mark_committed(offsets)
        except CommitFailedError as exc:  # a rebalance is under way: the revoke handler commits what it can
            log.warning("commit_deferred", reason=str(exc)[:200])

    async def _wait_drained(self, tps: list[TopicPartition] | None = None, timeout: float | None = None) -> bool:
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

    # -- exactly-once -------------------------------------------------------------------------------------

    async def _run_transactional(self) -> None:
        assert self.consumer is not None and self.producer is not None
        while not self._stopping.is_set():
            batch = await self.consumer.getmany(timeout_ms=100, max_records=self.config.max_batch)
            if not batch:
                continue
            async with self._batch_lock:
                outputs = await self._outputs(batch, time.perf_counter())
                t0 = time.perf_counter()
                async with self.producer.transaction():
                    for topic, key, value, _tp, _off in outputs:
                        await self.producer.send(topic, value, key=key)
                    offsets = {tp: OffsetAndMetadata(recs[-1].offset + 1, "") for tp, recs in batch.items()}
                    await self.producer.send_offsets_to_transaction(offsets, self.config.group_id)
                self.metrics.stage.observe("result_publish", time.perf_counter() - t0)

    # -- from records to outputs ------------------------------------------------------------------------

    async def _outputs(self, batch: Records, fetched_at: float | None = None) -> list[Output]:
        """Every record of the batch becomes one output - a result, a DLQ record or an admin reply - or, when
        it was refused as a poison request, two: its result and a DLQ record with its original bytes."""
        cfg = self.config
        now_ms = int(time.time() * 1000)
        outputs: list[Output] = []
        to_sign: list[tuple[SignRequest, ConsumerRecord[bytes, bytes]]] = []
        for tp, records in batch.items():
            for rec in records:
                if tp.topic == cfg.layout.admin:
                    outputs.append(await self._admin(rec))
                    continue
                try:
                    req = decode_sign_request(rec.value)
                except SchemaError as exc:
                    outputs.append(self._dlq(rec, exc))
                    continue
                self.metrics.stage.observe("kafka_wait", max(0, now_ms - rec.timestamp) / 1000)
                if req.deadline_ms is not None and req.deadline_ms <= now_ms:
                    outputs.append(self._result(req, rec, _expired(req, "before the request reached a host")))
                    continue
                to_sign.append((req, rec))
        if to_sign:
            # checked again right before dispatch: a batch may have waited for capacity
            now_ms = int(time.time() * 1000)
            live = []
            for req, rec in to_sign:
                if req.deadline_ms is not None and req.deadline_ms <= now_ms:
                    outputs.append(self._result(req, rec, _expired(req, "before dispatch to an enclave")))
                else:
                    live.append((req, rec))
            t0 = time.perf_counter()
            if fetched_at is not None:  # from fetch to the pool: decoding, and waiting behind earlier batches
                self.metrics.stage.observe_many("host_queue", [t0 - fetched_at] * len(live))
            results = await self.backend.sign_many([(req.key_id, rec.value) for req, rec in live])
            self.metrics.stage.observe("enclave_round_trip", time.perf_counter() - t0)
            for (req, rec), res in zip(live, results, strict=True):
                res.setdefault("timings_us", {})["kafka_wait"] = max(0, now_ms - rec.timestamp) * 1000
                outputs.append(self._result(req, rec, res))
                if (res.get("error") or {}).get("code") == Code.POISON_REQUEST:
                    outputs.append(self._poison_dlq(req, rec, res))
        return outputs

    def _result(self, req: SignRequest, rec: ConsumerRecord[bytes, bytes], result: dict[str, Any]) -> Output:
        status = result.get("status", "error")
        self.metrics.requests.labels(req.scheme, status).inc()
        if status != "ok":
            err = result.get("error") or {}
            log.info("request_refused", request_id=req.request_id, key_id=req.key_id, status=status,
                     code=err.get("code"))  # fmt: skip
        topic = req.reply_topic or self.config.layout.results
        value = msgpack.packb(result, use_bin_type=True)
        return topic, req.request_id.encode(), value, TopicPartition(rec.topic, rec.partition), rec.offset

    def _dlq(self, rec: ConsumerRecord[bytes, bytes], exc: SchemaError) -> Output:
        self.metrics.dlq.labels(exc.code.value).inc()
        log.info("dlq", reason=exc.code.value, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                 request_id=exc.request_id)  # fmt: skip
        record = DlqRecord(exc.code, exc.message, rec.topic, rec.partition, rec.offset, rec.value,
                           rec.key, exc.request_id)  # fmt: skip
        return self.config.layout.dlq, rec.key, record.encode(), TopicPartition(rec.topic, rec.partition), rec.offset

    def _poison_dlq(self, req: SignRequest, rec: ConsumerRecord[bytes, bytes], result: dict[str, Any]) -> Output:
        """A request refused as poison is also kept in the DLQ, with its original bytes, for inspection."""
        reason = Code.POISON_REQUEST
        self.metrics.dlq.labels(reason.value).inc()
        log.warning("dlq", reason=reason.value, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                    request_id=req.request_id)  # fmt: skip
        message = str((result.get("error") or {}).get("message", ""))
        record = DlqRecord(reason, message, rec.topic, rec.partition, rec.offset, rec.value, rec.key,
                           req.request_id)  # fmt: skip
        return self.config.layout.dlq, rec.key, record.encode(), TopicPartition(rec.topic, rec.partition), rec.offset

    async def _admin(self, rec: ConsumerRecord[bytes, bytes]) -> Output:
        try:
            req = decode_admin_request(rec.value)
        except SchemaError as exc:
            return self._dlq(rec, exc)
        body: dict[str, Any] = {"v": 1, "request_id": req["request_id"]}
        try:
            body.update(ok=True, result=await self.backend.handle(req["op"], req["args"]))
        except KeyOpError as exc:
            body.update(ok=False, error=exc.to_wire(max_message=None))
        log.info("admin_op", op=req["op"], request_id=req["request_id"], ok=body["ok"])
        topic = req["reply_topic"] or self.config.layout.admin_replies
        value = msgpack.packb(body, use_bin_type=True)
        return topic, req["request_id"].encode(), value, TopicPartition(rec.topic, rec.partition), rec.offset


def _expired(req: SignRequest, where: str) -> dict[str, Any]:
    return SignResult.failure(req.request_id, req.key_id, Code.DEADLINE_PASSED, f"deadline passed {where}").to_wire()


class _Rebalance(ConsumerRebalanceListener):
    """Hand partitions over without loss: finish their in-flight work and commit before letting go."""

    def __init__(self, host: HostWorker) -> None:
        self.host = host

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        host = self.host
        revoked = list(revoked)
        if host.config.exactly_once:
            async with host._batch_lock:  # the transaction in hand completes (or aborts) first
                return
        drained = await host._wait_drained(revoked, timeout=host.config.rebalance_drain_s)
        with contextlib.suppress(KafkaError):
            await host._commit(revoked)
        host.tracker.forget(revoked)
        log.info("partitions_revoked", partitions=len(revoked), drained=drained)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        host = self.host
        if host._paused and host.consumer is not None and assigned:
            host.consumer.pause(*assigned)
        log.info("partitions_assigned", partitions=len(assigned))
