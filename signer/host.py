"""The host worker: Kafka in, enclave channel, results out, offsets committed after results are durable.

Per fetched batch: decode strictly (bad input -> DLQ with its original bytes),
expire what is past its deadline, send the rest to the enclave as one frame,
publish every result with the idempotent acks=all producer, wait for the
acknowledgements, and only then commit the batch's offsets. A crash at any
point re-delivers uncommitted requests; signing is deterministic, so a redone
result carries the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import msgpack
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from broker.clients import request_consumer, result_producer
from schemas.admin import decode_admin_request
from schemas.dlq import DlqRecord
from schemas.errors import SchemaError
from schemas.sign_request import SignRequest, decode_sign_request
from schemas.sign_result import DEADLINE_PASSED, UNKNOWN_KEY, SignResult

from .channel import EnclaveConnection
from .config import HostConfig
from .keys import KeyManager, KeyOpError
from .keystore import DirectoryKeyStore
from .metrics import EnclaveStatsCollector, HostMetrics
from .pool import EnclavePool

log = structlog.get_logger("host")


class HostWorker:
    def __init__(self, config: HostConfig, metrics: HostMetrics | None = None) -> None:
        if not config.enclaves:
            raise ValueError("no enclave channel configured (SIGNER_ENCLAVES)")
        self.config = config
        self.metrics = metrics or HostMetrics()
        if not config.keystore_dir:
            raise ValueError("no key store configured (SIGNER_KEYSTORE_DIR)")
        self.keystore = DirectoryKeyStore(Path(config.keystore_dir))
        self.pool = EnclavePool(config.enclaves, config.pool, self.metrics, prepare=self._prepare_connection)
        self.keys = KeyManager(self.pool, self.keystore, config.kms_key_id, config.default_keyring)
        EnclaveStatsCollector(self._enclave_stats, self.metrics.registry)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self.kafka_ready = False

    async def _prepare_connection(self, conn: EnclaveConnection) -> None:
        await self.keys.load_into(conn)

    def _enclave_stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for conn in self.pool.connections:
            if conn.enclave_id and conn.enclave_stats:
                out.setdefault(conn.enclave_id, conn.enclave_stats)
        return out

    async def start(self) -> None:
        cfg = self.config
        await self.pool.start()
        try:
            async with asyncio.timeout(cfg.enclave_wait_s):
                await self.pool.wait_ready()
        except TimeoutError:
            log.warning("no_enclave_yet", waited_s=cfg.enclave_wait_s, enclaves=cfg.enclaves)
        self.producer = result_producer(cfg.bootstrap)
        await self.producer.start()
        self.consumer = request_consumer(cfg.bootstrap, cfg.layout.requests, cfg.layout.admin, group_id=cfg.group_id)
        await self.consumer.start()
        self.kafka_ready = True

    async def run(self) -> None:
        """Consume until stop(); then finish the batch in hand, commit, leave the group."""
        assert self.consumer is not None
        try:
            while not self._stopping.is_set():
                await self.pool.wait_capacity()
                batch = await self.consumer.getmany(timeout_ms=200, max_records=self.config.max_batch)
                if batch:
                    await self._process(batch)
        finally:
            await self._close()

    def stop(self) -> None:
        self._stopping.set()

    async def stop_within(self, run: asyncio.Task[None], timeout: float) -> None:
        """Graceful stop: finish the batch in hand and commit; past the timeout, cancel.

        Cancelling loses nothing: uncommitted requests are redelivered to the next
        owner of their partitions, and signing them again yields the same bytes.
        """
        self.stop()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(run)
        except TimeoutError:
            log.warning("shutdown_timeout", timeout_s=timeout, in_flight=self.pool.in_flight + self.pool.queued)
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run

    async def _close(self) -> None:
        self.kafka_ready = False
        if self.consumer is not None:
            await self.consumer.stop()  # leaves the group
        if self.producer is not None:
            await self.producer.stop()  # flushes
        await self.pool.close()
        self.metrics.enclaves_connected.set(0)

    async def _process(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        assert self.producer is not None and self.consumer is not None
        cfg = self.config
        now_ms = int(time.time() * 1000)
        acks: list[asyncio.Future[Any]] = []
        to_sign: list[tuple[SignRequest, bytes, int]] = []
        count = sum(len(r) for r in batch.values())
        self.metrics.in_flight.set(count)
        for tp, records in batch.items():
            for rec in records:
                if tp.topic == cfg.layout.admin:
                    acks.append(await self._admin(rec))
                    continue
                try:
                    req = decode_sign_request(rec.value)
                except SchemaError as exc:
                    acks.append(await self._to_dlq(rec, exc))
                    continue
                self.metrics.stage.observe("kafka_wait", max(0, now_ms - rec.timestamp) / 1000)
                if req.deadline_ms is not None and req.deadline_ms <= now_ms:
                    expired = SignResult.failure(req.request_id, req.key_id, "expired", DEADLINE_PASSED,
                                             "deadline passed before the request reached an enclave")  # fmt: skip
                    acks.append(await self._publish(req, expired.to_wire()))
                    continue
                to_sign.append((req, rec.value, max(0, now_ms - rec.timestamp)))
        if to_sign:
            t0 = time.perf_counter()
            route = self.keys.route_key
            results = await self.pool.submit_many([(route(req.key_id), raw) for req, raw, _ in to_sign])
            await self._retry_keys_from_elsewhere(to_sign, results)
            self.metrics.stage.observe("enclave_round_trip", time.perf_counter() - t0)
            for res, (req, _, wait_ms) in zip(results, to_sign, strict=True):
                res.setdefault("timings_us", {})["kafka_wait"] = wait_ms * 1000
                acks.append(await self._publish(req, res))
        t0 = time.perf_counter()
        await asyncio.gather(*acks)  # every result durably written (acks=all) ...
        self.metrics.stage.observe("result_publish", time.perf_counter() - t0)
        # ... before the offsets that produced them are committed
        await self.consumer.commit({tp: OffsetAndMetadata(records[-1].offset + 1, "") for tp, records in batch.items()})
        self.metrics.in_flight.set(0)

    async def _retry_keys_from_elsewhere(
        self, to_sign: list[tuple[SignRequest, bytes, int]], results: list[dict[str, Any]]
    ) -> None:
        """A key the enclaves do not know may have been created through another host:
        re-read the key store, load what it has, and ask again once."""
        missing = [i for i, r in enumerate(results) if (r.get("error") or {}).get("code") == UNKNOWN_KEY]
        if not missing:
            return
        found = await self.keys.reload_keys({to_sign[i][0].key_id for i in missing})
        retry = [i for i in missing if to_sign[i][0].key_id in found]
        if retry:
            route = self.keys.route_key
            again = await self.pool.submit_many([(route(to_sign[i][0].key_id), to_sign[i][1]) for i in retry])
            for i, res in zip(retry, again, strict=True):
                results[i] = res

    async def _publish(self, req: SignRequest, result: dict[str, Any]) -> asyncio.Future[Any]:
        assert self.producer is not None
        self.metrics.requests.labels(req.scheme, result.get("status", "error")).inc()
        topic = req.reply_topic or self.config.layout.results
        return await self.producer.send(topic, msgpack.packb(result, use_bin_type=True), key=req.request_id.encode())

    async def _to_dlq(self, rec: ConsumerRecord[bytes, bytes], exc: SchemaError) -> asyncio.Future[Any]:
        assert self.producer is not None
        self.metrics.dlq.labels(exc.code).inc()
        log.info("dlq", reason=exc.code, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                 request_id=exc.request_id)  # fmt: skip
        record = DlqRecord(exc.code, exc.message, rec.topic, rec.partition, rec.offset, rec.value,
                           rec.key, exc.request_id)  # fmt: skip
        return await self.producer.send(self.config.layout.dlq, record.encode(), key=rec.key)

    async def _admin(self, rec: ConsumerRecord[bytes, bytes]) -> asyncio.Future[Any]:
        assert self.producer is not None
        try:
            req = decode_admin_request(rec.value)
        except SchemaError as exc:
            return await self._to_dlq(rec, exc)
        body: dict[str, Any] = {"v": 1, "request_id": req["request_id"]}
        try:
            body.update(ok=True, result=await self.keys.handle(req["op"], req["args"]))
        except KeyOpError as exc:
            body.update(ok=False, error={"code": exc.code, "message": exc.message})
        log.info("admin_op", op=req["op"], request_id=req["request_id"], ok=body["ok"])
        topic = req["reply_topic"] or self.config.layout.admin_replies
        return await self.producer.send(topic, msgpack.packb(body, use_bin_type=True), key=req["request_id"].encode())
