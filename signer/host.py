"""The host worker: Kafka in, enclaves, outputs out, offsets committed only after outputs are durable.

`HostWorker` owns and wires the parts, each in a file named after it:

- signer/backend.py   `EnclaveBackend`: the enclave pool and the key store, routing, key loading
- signer/intake.py    `Intake`: what each record becomes (sign work, DLQ record, expired result)
- signer/admin.py     `AdminLane`: sign.admin records, on a task of their own
- signer/delivery.py  the run modes, `AtLeastOnce` (pipelined) and `ExactlyOnce` (transactions)
- signer/commits.py   `Commits`: records done when their outputs are acknowledged; commits, lag
- signer/backpressure.py `Backpressure`: pause and resume partitions around SIGNER_MAX_IN_FLIGHT
- signer/credentials.py  the KMS credentials handed to the enclaves

It starts the backend and the Kafka clients, runs the configured mode until stop(), and on the
way out lets what is in flight finish, commits, and leaves the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from broker.clients import request_consumer, result_producer

from .admin import AdminLane
from .backend import EnclaveBackend
from .config import HostConfig
from .credentials import kms_credentials
from .delivery import AtLeastOnce, ExactlyOnce, RunMode
from .intake import Intake
from .keystore import open_keystore
from .metrics import EnclaveStatsCollector, HostMetrics

log = structlog.get_logger("host")


class HostWorker:
    def __init__(self, config: HostConfig, metrics: HostMetrics | None = None) -> None:
        if not config.enclaves:
            raise ValueError("no enclave channel configured (SIGNER_ENCLAVES)")
        if not config.keystore:
            raise ValueError("no key store configured (SIGNER_KEYSTORE)")
        self.config = config
        self.metrics = metrics or HostMetrics()
        kafka = {"replication_factor": config.layout.replication_factor} if config.keystore.startswith("kafka:") else {}
        store = open_keystore(config.keystore, bootstrap=config.bootstrap, **kafka)
        self.backend = EnclaveBackend(
            config.enclaves, store, config.pool, self.metrics,
            default_keyring=config.default_keyring,
            credentials=functools.partial(kms_credentials, config.kms_credentials_file),
            preload_keys=config.preload_keys,
        )  # fmt: skip
        EnclaveStatsCollector(self.backend.enclave_stats, self.metrics.registry)
        self.intake = Intake(config.layout, self.backend, self.metrics)
        self.admin = AdminLane(config.layout, self.backend, self.intake)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.mode: RunMode | None = None
        self._stopping = asyncio.Event()
        self.kafka_ready = False

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
        mode = ExactlyOnce if cfg.exactly_once else AtLeastOnce
        self.mode = mode(cfg, self.consumer, self.producer, self.intake, self.admin, self.metrics)
        self.consumer.subscribe([cfg.layout.requests, cfg.layout.admin], listener=self.mode)
        await self.consumer.start()
        self.kafka_ready = True
        log.info("host_started", mode="exactly_once" if cfg.exactly_once else "at_least_once",
                 group=cfg.group_id, max_in_flight=cfg.max_in_flight)  # fmt: skip

    async def run(self) -> None:
        """Consume until stop(); then finish what is in flight, commit, and leave the group."""
        assert self.mode is not None, "start() first"
        try:
            await self.mode.run(self._stopping)
        finally:
            # also on a cancelled (timed-out) shutdown: whatever is done need not be redone
            await self.mode.last_commit()
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
            log.warning("shutdown_timeout", timeout_s=timeout, in_flight=self.mode.in_flight if self.mode else 0)
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
