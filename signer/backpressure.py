"""Backpressure: memory stays bounded however far producers run ahead of the enclaves.

At SIGNER_MAX_IN_FLIGHT records in flight (fetched and not yet done) the host pauses every
partition it owns - it keeps polling, so it stays in the group - and resumes them at
SIGNER_RESUME_BELOW; a fetch never asks for more than the room left, and newly assigned
partitions inherit the pause. This one bound also covers what waits in the enclave pool: the
at-least-once mode counts the larger of its records not done and the pool's requests, so records
a rebalance forgot while their requests were still in the pool keep counting until they leave it.
"""

from __future__ import annotations

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from .metrics import HostMetrics

log = structlog.get_logger("host")


class Backpressure:
    def __init__(self, consumer: AIOKafkaConsumer, max_in_flight: int, resume_below: int, metrics: HostMetrics):
        self.consumer = consumer
        self.max_in_flight = max_in_flight
        self.resume_below = resume_below
        self.metrics = metrics
        self.paused = False

    def room(self, in_flight: int) -> int:
        """Pause or resume around the watermarks; how many records the next fetch may take (at least 1:
        a paused consumer returns none)."""
        consumer = self.consumer
        if not self.paused and in_flight >= self.max_in_flight:
            self.paused = True
            consumer.pause(*consumer.assignment())
            self.metrics.paused_partitions.set(len(consumer.paused()))
            log.info("partitions_paused", in_flight=in_flight, partitions=len(consumer.paused()))
        elif self.paused and in_flight <= self.resume_below:
            self.paused = False
            consumer.resume(*consumer.paused())
            self.metrics.paused_partitions.set(0)
            log.info("partitions_resumed", in_flight=in_flight)
        return max(1, self.max_in_flight - in_flight)

    def assigned(self, tps: list[TopicPartition]) -> None:
        """Newly assigned partitions inherit the pause."""
        if self.paused and tps:
            self.consumer.pause(*tps)
