"""The admin lane: `sign.admin` records, handled on a task of their own.

A key operation can take long - `keys.create` of a new keyring waits for KMS, up to the
enclave's unwrap timeout when KMS throttles - and must not hold up the sign requests fetched
with it. The fetch loop hands admin records here and goes on; the lane handles them one at a
time in fetch order (the key manager serializes operations per keyring anyway), and hands each
reply to the run mode's `deliver`, which publishes it and only then lets the record's offset be
committed: at-least-once, the reply is acknowledged before the record counts as done; exactly
once, the reply and the record's offset are one transaction. The admin topic has partitions of
its own, so a slow operation never holds back the commits of `sign.requests`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import msgpack
import structlog
from aiokafka import TopicPartition

from broker.topics import TopicLayout
from schemas.admin import decode_admin_request
from schemas.errors import SchemaError

from .backend import EnclaveBackend
from .intake import Intake, Output, Record
from .keys import KeyOpError

log = structlog.get_logger("host")

Deliver = Callable[[Record, Output], Awaitable[None]]


class AdminLane:
    def __init__(self, layout: TopicLayout, backend: EnclaveBackend, intake: Intake) -> None:
        self.layout = layout
        self.backend = backend
        self.intake = intake  # for the DLQ record of a malformed admin request
        self._queue: deque[Record] = deque()
        self._current: Record | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # set whenever a record is finished or dropped

    @property
    def pending(self) -> int:
        """Admin records fetched and not yet replied to."""
        return len(self._queue) + (self._current is not None)

    def put(self, records: list[Record]) -> None:
        if records:
            self._queue.extend(records)
            self._wake.set()

    def drop(self, tps: Collection[TopicPartition]) -> int:
        """Partitions revoked: their records not yet started are the next owner's to handle."""
        revoked = set(tps)
        kept = deque(r for r in self._queue if TopicPartition(r.topic, r.partition) not in revoked)
        dropped = len(self._queue) - len(kept)
        self._queue = kept
        self._progress.set()
        return dropped

    async def settled(self, tps: Collection[TopicPartition] | None = None) -> None:
        """Return once no record (of these partitions, or at all) is queued or being handled."""
        while self._busy(tps):
            self._progress.clear()
            await self._progress.wait()

    def _busy(self, tps: Collection[TopicPartition] | None) -> bool:
        records = [*self._queue, *([self._current] if self._current is not None else [])]
        if tps is None:
            return bool(records)
        wanted = set(tps)
        return any(TopicPartition(r.topic, r.partition) in wanted for r in records)

    async def run(self, deliver: Deliver) -> None:
        """Handle queued records one at a time, in fetch order, until cancelled. A failure to deliver
        a reply ends the lane with it (and the host: nothing uncommitted is lost)."""
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            rec = self._current = self._queue.popleft()
            try:
                await deliver(rec, await self.reply(rec))
            finally:
                self._current = None
                self._progress.set()

    async def reply(self, rec: Record) -> Output:
        """The operation's reply (ok and its result, or its error); a malformed request goes to the DLQ."""
        try:
            req = decode_admin_request(rec.value)
        except SchemaError as exc:
            return self.intake.dlq(rec, exc)
        body: dict[str, Any] = {"v": 1, "request_id": req["request_id"]}
        try:
            body.update(ok=True, result=await self.backend.handle(req["op"], req["args"]))
        except KeyOpError as exc:
            body.update(ok=False, error=exc.to_wire(max_message=None))
        log.info("admin_op", op=req["op"], request_id=req["request_id"], ok=body["ok"])
        topic = req["reply_topic"] or self.layout.admin_replies
        value = msgpack.packb(body, use_bin_type=True)
        return Output(topic, req["request_id"].encode(), value, TopicPartition(rec.topic, rec.partition), rec.offset)
