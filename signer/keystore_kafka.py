"""The key store as a compacted topic on the cluster's own Kafka (`kafka://`, topic sign.keys).

One partition, so every host reads the records in one order; `cleanup.policy=compact`, so the
topic keeps the last record per record key and never ages records out. Every host tails the topic
and holds the view (signer/keystore.py, `KeyView`); before it answers that a key is unknown it
reads up to the end offset it just asked for (`refresh`).

Record keys (UTF-8) never collide between competing creators, so compaction cannot make one
creator's record replace another's:

    e/<keyring>/<version>/<nonce>           an envelope; nonce is random per write
    k/<keyring>/<version>/<tag>/<key_id>    a sealed key; tag names the data key it is sealed under

The rule every host computes identically: for a keyring version, the envelope with the LOWEST
OFFSET wins. Envelope records are never compacted away (their keys are unique), so the winner
never changes. A creator learns whether it won by reading up to its own record's offset; a loser
gets KeyringConflict. A keyring's keys are the sealed keys whose tag is the winner's (a loser's
keys, written by a racing rotation, stay in the topic and are ignored). Re-writing a key record
under the same record key is harmless: compaction keeps the last one, and so does the view.

Compaction is an optimisation only: the view applies the same last-per-record-key rule, so a host
reading uncompacted segments (the active segment never is) builds the same view. Nothing relies on
tombstones (they vanish after delete.retention.ms): the store writes none and ignores any it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from broker.clients import result_producer
from broker.topics import ensure_keys_topic
from schemas.records import KeyringEnvelope, SealedKey

from .keystore import (
    UNDECODABLE,
    KeyringConflict,
    KeyStoreError,
    ViewedKeyStore,
    check_ids,
    dek_tag,
    encode,
    stored_envelope,
    stored_key,
)

log = structlog.get_logger("keystore")


class KafkaKeyStore(ViewedKeyStore):
    def __init__(
        self, bootstrap: str, topic: str = "sign.keys", *, read_timeout_s: float = 10.0,
        topic_configs: Mapping[str, str] | None = None, replication_factor: int | None = None, writer: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.writer = writer  # False: a reader only (no producer; a missing topic is an empty store)
        self.bootstrap, self.topic = bootstrap, topic
        self.url = "kafka://" if topic == "sign.keys" else f"kafka:///{topic}"
        self.read_timeout_s = read_timeout_s
        self.topic_configs = dict(topic_configs or {})
        self.replication_factor = replication_factor
        self.records = 0  # records read (all kinds, including skipped ones)
        self._tp = TopicPartition(topic, 0)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tail: asyncio.Task[None] | None = None
        self._position = 0  # the next offset the view has not seen
        self._moved = asyncio.Condition()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the topic if it is missing, read it to its end, and go on tailing it."""
        if self.writer:
            await ensure_keys_topic(self.bootstrap, self.topic, replication_factor=self.replication_factor,
                                    configs=self.topic_configs)  # fmt: skip
        try:
            if self.writer:
                self._producer = result_producer(self.bootstrap, client_id="signer-keystore", linger_ms=0)
                await self._producer.start()
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, client_id="signer-keystore", group_id=None,
                enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=100,
                max_partition_fetch_bytes=4 * 1024 * 1024,
            )  # fmt: skip
            await self._consumer.start()
            if not self.writer and self.topic not in await self._consumer.topics():
                return  # nothing stored yet; this reader has nothing to tail
            self._consumer.assign([self._tp])
            await self._consumer.seek_to_beginning(self._tp)
            self._tail = asyncio.create_task(self._read(self._consumer), name=f"keystore-tail-{self.topic}")
            await self.refresh()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._tail
            self._tail = None
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(KafkaError):
                    await client.stop()
        self._consumer = self._producer = None

    # -- reading ----------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Return once the view holds every record up to the topic's end offset as of now."""
        consumer = self._running()
        try:
            async with asyncio.timeout(self.read_timeout_s):
                end = (await consumer.end_offsets([self._tp]))[self._tp]
        except (KafkaError, TimeoutError) as exc:
            raise KeyStoreError(f"{self.url}: cannot read the end offset of {self.topic}: {exc!r}") from None
        await self._caught_up(end)

    async def _caught_up(self, offset: int) -> None:
        """Wait until the view has seen every record below `offset`: however long that takes while the
        reader moves (a new host reads a million keys in ~15 s), but no longer than read_timeout_s
        without the reader moving at all."""

        def moved_from(seen: int) -> Callable[[], bool]:
            return lambda: (self._position >= offset or self._position != seen
                            or self._tail is None or self._tail.done())  # fmt: skip

        while True:
            try:
                async with asyncio.timeout(self.read_timeout_s), self._moved:
                    await self._moved.wait_for(moved_from(self._position))
            except TimeoutError:
                raise KeyStoreError(f"{self.url}: not read up to offset {offset}: no progress for "
                                    f"{self.read_timeout_s} s (at {self._position})") from None  # fmt: skip
            if self._position >= offset or self._tail is None or self._tail.done():
                break
        self._running()

    def _running(self) -> AIOKafkaConsumer:
        if self._consumer is None or self._tail is None:
            raise KeyStoreError(f"{self.url}: not started")
        if self._tail.done():
            exc = self._tail.exception() if not self._tail.cancelled() else None
            raise KeyStoreError(f"{self.url}: the reader of {self.topic} stopped: {exc!r}")
        return self._consumer

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        """The tail: apply records in offset order; wake whoever waits for a position."""
        try:
            while True:
                try:
                    batches = await consumer.getmany(self._tp, timeout_ms=500, max_records=5000)
                except KafkaError as exc:  # the consumer reconnects by itself; this read is retried
                    log.warning("keystore_read_failed", store=self.url, error=repr(exc)[:200])
                    await asyncio.sleep(0.5)
                    continue
                for records in batches.values():
                    for record in records:
                        self._apply(record.offset, record.key, record.value)
                position = await consumer.position(self._tp)
                if position != self._position:
                    async with self._moved:
                        self._position = position
                        self._moved.notify_all()
        finally:  # a reader that stopped wakes its waiters, who then see why
            async with self._moved:
                self._moved.notify_all()

    def _apply(self, offset: int, key: bytes | None, value: bytes | None) -> None:
        self.records += 1
        if value is None:
            return  # a tombstone: this store writes none, and nothing may depend on one
        try:
            parts = (key or b"").decode().split("/")
            if parts[0] == "e" and len(parts) == 4:
                self.view.add_envelope(stored_envelope(value, parts[1], parts[2]))
            elif parts[0] == "k" and len(parts) == 5:
                self.view.add_key(stored_key(value, parts[1], parts[2], parts[4]), parts[3])
            else:
                raise ValueError("not a key store record key")
        except (*UNDECODABLE, UnicodeDecodeError) as exc:
            self.skipped(f"{self.topic}@{offset} {key!r}", exc)

    # -- writing ----------------------------------------------------------------------------------

    def _producer_running(self) -> AIOKafkaProducer:
        self._running()
        if self._producer is None:
            raise KeyStoreError(f"{self.url}: opened for reading only")
        return self._producer

    async def put_envelope(self, env: KeyringEnvelope) -> None:
        """Store a new keyring version; KeyringConflict if another envelope holds that version (an
        earlier offset), read back from the topic, so every host agrees on who won."""
        check_ids(env)
        producer = self._producer_running()
        await self.refresh()
        won = self.view.envelope_version(env.keyring_id, env.dek_version)
        if won is None:
            key = f"e/{env.keyring_id}/{env.dek_version}/{uuid.uuid4().hex}"
            meta = await producer.send_and_wait(self.topic, encode(env), key=key.encode(), partition=0)
            await self._caught_up(meta.offset + 1)
            won = self.view.envelope_version(env.keyring_id, env.dek_version)
        if won != env:  # the same record again (a copy, a retry) is no conflict
            raise KeyringConflict(f"keyring {env.keyring_id} version {env.dek_version} already exists")

    async def put_keys(self, envelope: KeyringEnvelope, keys: list[SealedKey]) -> None:
        """Store sealed keys (sealed under `envelope`'s data key); return once the view holds them."""
        check_ids(envelope, keys)
        producer = self._producer_running()
        tag = dek_tag(envelope)
        sends: list[Any] = []
        for key in keys:
            if self.view.has_key(key, tag):
                continue  # already stored as it is (migrate again, a retry): no new record
            record_key = f"k/{key.keyring_id}/{key.dek_version}/{tag}/{key.key_id}"
            sends.append(await producer.send(self.topic, encode(key), key=record_key.encode(), partition=0))
        if sends:
            metas = await asyncio.gather(*sends)
            await self._caught_up(max(m.offset for m in metas) + 1)
