"""OffsetTracker: per partition, the highest offset below which every record is done.

A record is done when its output (result, DLQ record or admin reply) is durably
written. Records finish out of order (batches overlap, enclaves differ); the
commit position of a partition only moves past a contiguous run of done records.
Offsets need not be consecutive (transaction markers and compaction leave gaps):
the tracker follows the offsets it was given, in order.
"""

from __future__ import annotations

from collections import OrderedDict

from aiokafka import TopicPartition


class _Partition:
    __slots__ = ("committed", "next_commit", "pending")

    def __init__(self) -> None:
        self.pending: OrderedDict[int, bool] = OrderedDict()  # offset -> done, in fetch order
        self.next_commit: int | None = None  # the offset a commit would record now
        self.committed: int | None = None  # the last offset actually committed


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}
        self.in_flight = 0

    def add(self, tp: TopicPartition, offsets: list[int]) -> None:
        part = self._parts.setdefault(tp, _Partition())
        for off in offsets:
            part.pending[off] = False
        self.in_flight += len(offsets)

    def done(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is None or part.pending.get(offset) is not False:
            return  # partition revoked meanwhile, or already done: nothing to do
        part.pending[offset] = True
        self.in_flight -= 1
        while part.pending:
            first, is_done = next(iter(part.pending.items()))
            if not is_done:
                break
            part.pending.popitem(last=False)
            part.next_commit = first + 1

    def pending(self, tps: list[TopicPartition] | None = None) -> int:
        """Records fetched and not yet done (on the given partitions, or all)."""
        if tps is None:
            return self.in_flight
        return sum(sum(1 for d in self._parts[tp].pending.values() if not d) for tp in tps if tp in self._parts)

    def committable(self, tps: list[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Positions that moved since the last commit: {partition: next offset to read}."""
        out = {}
        for tp, part in self._parts.items():
            if tps is not None and tp not in tps:
                continue
            if part.next_commit is not None and part.next_commit != part.committed:
                out[tp] = part.next_commit
        return out

    def committed(self, tp: TopicPartition) -> int | None:
        part = self._parts.get(tp)
        return part.committed if part is not None else None

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            if tp in self._parts:
                self._parts[tp].committed = off

    def forget(self, tps: list[TopicPartition]) -> None:
        """Partitions revoked: their unfinished records belong to the next owner."""
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is not None:
                self.in_flight -= sum(1 for d in part.pending.values() if not d)
