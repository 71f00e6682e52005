"""Key management through Kafka: what `signer keys create` uses to reach a running cluster."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from broker.topics import TopicLayout
from schemas.refusals import Code, Refused


class AdminError(Refused, RuntimeError):
    """The cluster refused the operation (its reply's error), or no reply came (``timeout``)."""


async def admin_call(
    bootstrap: str, op: str, args: dict[str, Any], layout: TopicLayout | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:  # fmt: skip
    """Send one admin request to the cluster and wait for its reply; raise AdminError on refusal."""
    layout = layout or TopicLayout()
    request_id = f"admin-{uuid.uuid4()}"
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    try:
        await consumer.start()
        await producer.start()
        async with asyncio.timeout(timeout):
            # position on the reply partition *before* asking, so the reply cannot be missed
            tp = TopicPartition(layout.admin_replies, 0)
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            await consumer.position(tp)
            body = {"v": 1, "request_id": request_id, "op": op, "args": args,
                    "reply_topic": layout.admin_replies}  # fmt: skip
            await producer.send_and_wait(layout.admin, msgpack.packb(body, use_bin_type=True), key=request_id.encode())
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for rec in records:
                        reply = msgpack.unpackb(rec.value, raw=False)
                        if reply.get("request_id") != request_id:
                            continue
                        if not reply.get("ok"):
                            raise AdminError.from_wire(reply.get("error"))
                        return dict(reply.get("result") or {})
    except TimeoutError:
        raise AdminError(
            Code.TIMEOUT, f"no reply on {layout.admin_replies} within {timeout:.0f}s: is a host worker running?"
        ) from None
    finally:
        await producer.stop()
        await consumer.stop()
