"""What each fetched record becomes: its outputs.

Every record yields at least one output - a result, a DLQ record or an admin reply - and a
refused request that can be named yields two (its result and a DLQ record with its original
bytes); a record is done when all its outputs are acknowledged (signer/commits.py).

- `sign.admin` records are split off for the admin lane (signer/admin.py), which handles them
  on a task of their own.
- `sign.requests` records are read as far as the host needs them (`decode_envelope`: every
  field checked but the payload's shape for its scheme, which the enclave checks and parses
  anyway): undecodable or invalid input goes to the DLQ with its original bytes and a reason,
  and, when its `request_id` can be read, is also answered with a refusal (on its `reply_topic`
  if that can be read, else `sign.results`), so a caller waiting for its result hears of it;
  a request past its deadline is answered `expired`; the rest is sign work.
- Sign work is checked against its deadline again right before dispatch (a batch may have
  waited), signed through the enclave backend, and each result becomes an output; a refusal
  whose code belongs in the DLQ too (an invalid payload the enclave found, a poison request) is
  also kept there with the request's original bytes.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, NamedTuple, TypeAlias

import msgpack
import structlog
from aiokafka import ConsumerRecord, TopicPartition

from broker.topics import TopicLayout
from schemas.dlq import DlqRecord
from schemas.errors import SchemaError
from schemas.refusals import Code, Surface
from schemas.sign_request import SignRequest, decode_envelope, readable_ids
from schemas.sign_result import SignResult

from .backend import EnclaveBackend
from .metrics import HostMetrics

log = structlog.get_logger("host")

Record: TypeAlias = ConsumerRecord[bytes, bytes]
Records: TypeAlias = dict[TopicPartition, list[Record]]
Work: TypeAlias = list[tuple[SignRequest, Record]]


class Output(NamedTuple):
    """A record to publish for an input record (`source` partition, `offset`)."""

    topic: str
    key: bytes | None
    value: bytes
    source: TopicPartition
    offset: int


class Intake:
    def __init__(self, layout: TopicLayout, backend: EnclaveBackend, metrics: HostMetrics) -> None:
        self.layout = layout
        self.backend = backend
        self.metrics = metrics

    def split(self, batch: Records) -> tuple[Records, list[Record]]:
        """A fetched batch as (sign.requests records by partition, sign.admin records in fetch order)."""
        requests: Records = {}
        admin: list[Record] = []
        for tp, records in batch.items():
            if tp.topic == self.layout.admin:
                admin += records
            else:
                requests[tp] = records
        return requests, admin

    async def outputs(self, batch: Records, fetched_at: float | None = None) -> list[Output]:
        """The outputs of a batch of sign.requests records: classified, then the sign work signed."""
        work, outputs = self.classify(batch)
        if work:
            outputs += await self.sign(work, fetched_at)
        return outputs

    def classify(self, batch: Records) -> tuple[Work, list[Output]]:
        """Decode each record: (sign work, outputs already decided: DLQ records and expired results)."""
        now_ms = int(time.time() * 1000)
        outputs: list[Output] = []
        work: Work = []
        waits: list[float] = []
        for records in batch.values():
            for rec in records:
                try:
                    req = decode_envelope(rec.value)
                except SchemaError as exc:
                    outputs += self.refused_at_intake(rec, exc)
                    continue
                waits.append(max(0, now_ms - rec.timestamp) / 1000)
                if req.deadline_ms is not None and req.deadline_ms <= now_ms:
                    outputs.append(self.result(req, rec, _expired(req, "before the request reached a host")))
                    continue
                work.append((req, rec))
        self.metrics.stage.observe_many("kafka_wait", waits)
        return work, outputs

    async def sign(self, work: Work, fetched_at: float | None = None) -> list[Output]:
        """Sign through the enclaves; one output per request, two for a poison request."""
        # checked again right before dispatch: a batch may have waited for capacity
        now_ms = int(time.time() * 1000)
        outputs: list[Output] = []
        live: Work = []
        for req, rec in work:
            if req.deadline_ms is not None and req.deadline_ms <= now_ms:
                outputs.append(self.result(req, rec, _expired(req, "before dispatch to an enclave")))
            else:
                live.append((req, rec))
        t0 = time.perf_counter()
        if fetched_at is not None:  # from fetch to the pool: decoding, and waiting behind earlier batches
            self.metrics.stage.observe_n("host_queue", t0 - fetched_at, len(live))
        results = await self.backend.sign_many([(req.key_id, rec.value) for req, rec in live])
        self.metrics.stage.observe("enclave_round_trip", time.perf_counter() - t0)
        signed: Counter[str] = Counter()  # scheme -> requests signed `ok` (refusals are counted one by one)
        packb, results_topic = msgpack.packb, self.layout.results
        for (req, rec), res in zip(live, results, strict=True):
            timings = res.get("timings_us")
            if type(timings) is dict:
                timings["kafka_wait"] = max(0, now_ms - rec.timestamp) * 1000
            if res.get("status") == "ok":  # the common case, without the refusal bookkeeping of result()
                signed[req.scheme] += 1
                outputs.append(Output(req.reply_topic or results_topic, req.request_id.encode(),
                                      packb(res, use_bin_type=True), TopicPartition(rec.topic, rec.partition),
                                      rec.offset))  # fmt: skip
                continue
            if timings is None:
                res["timings_us"] = {"kafka_wait": max(0, now_ms - rec.timestamp) * 1000}
            outputs.append(self.result(req, rec, res))
            code = (res.get("error") or {}).get("code")
            if code in _DLQ_TOO:  # an invalid payload the enclave found, a poison request: kept in the DLQ too
                outputs.append(self.refusal_dlq(req, rec, res, _DLQ_TOO[code]))
        for scheme, n in signed.items():
            self.metrics.requests.labels(scheme, "ok").inc(n)
        return outputs

    # -- outputs ---------------------------------------------------------------------------------

    def result(self, req: SignRequest, rec: Record, result: dict[str, Any]) -> Output:
        status = result.get("status", "error")
        self.metrics.requests.labels(req.scheme, status).inc()
        if status != "ok":
            err = result.get("error") or {}
            log.info("request_refused", request_id=req.request_id, key_id=req.key_id, status=status,
                     code=err.get("code"))  # fmt: skip
        topic = req.reply_topic or self.layout.results
        value = msgpack.packb(result, use_bin_type=True)
        return Output(topic, req.request_id.encode(), value, TopicPartition(rec.topic, rec.partition), rec.offset)

    def dlq(self, rec: Record, exc: SchemaError) -> Output:
        """Invalid input's DLQ record, with its original bytes and the reason."""
        self.metrics.dlq.labels(exc.code.value).inc()
        log.info("dlq", reason=exc.code.value, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                 request_id=exc.request_id)  # fmt: skip
        record = DlqRecord(exc.code, exc.message, rec.topic, rec.partition, rec.offset, rec.value,
                           rec.key, exc.request_id)  # fmt: skip
        return Output(self.layout.dlq, rec.key, record.encode(), TopicPartition(rec.topic, rec.partition), rec.offset)

    def refused_at_intake(self, rec: Record, exc: SchemaError) -> list[Output]:
        """Invalid input: a DLQ record; and when it names its request, a refusal where its caller waits."""
        outputs = [self.dlq(rec, exc)]
        source = outputs[0].source
        if exc.request_id:
            _, key_id, reply_topic = readable_ids(rec.value)
            result = SignResult.refused(exc.request_id, key_id or "", exc).to_wire()
            value = msgpack.packb(result, use_bin_type=True)
            outputs.append(
                Output(reply_topic or self.layout.results, exc.request_id.encode(), value, source, rec.offset)
            )
        return outputs

    def refusal_dlq(self, req: SignRequest, rec: Record, result: dict[str, Any], reason: Code) -> Output:
        """A request the enclave refused for what it is (an invalid payload, a poison request) is also
        kept in the DLQ, with its original bytes, for inspection."""
        self.metrics.dlq.labels(reason.value).inc()
        log.warning("dlq", reason=reason.value, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                    request_id=req.request_id)  # fmt: skip
        message = str((result.get("error") or {}).get("message", ""))
        record = DlqRecord(reason, message, rec.topic, rec.partition, rec.offset, rec.value, rec.key,
                           req.request_id)  # fmt: skip
        return Output(self.layout.dlq, rec.key, record.encode(), TopicPartition(rec.topic, rec.partition), rec.offset)


# result codes that also put the request in the DLQ: those of the catalogue's DLQ surface
_DLQ_TOO = {code.value: code for code in Code if Surface.DLQ in code.surfaces and Surface.RESULT in code.surfaces}


def _expired(req: SignRequest, where: str) -> dict[str, Any]:
    return SignResult.failure(req.request_id, req.key_id, Code.DEADLINE_PASSED, f"deadline passed {where}").to_wire()
