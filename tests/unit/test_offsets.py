"""Per-partition contiguous commits."""

from __future__ import annotations

import random

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from signer.offsets import OffsetTracker

TP = TopicPartition("sign.requests", 0)
TP2 = TopicPartition("sign.requests", 1)


def test_commit_moves_only_past_a_contiguous_done_run() -> None:
    t = OffsetTracker()
    t.add(TP, [10, 11, 12, 13])
    t.done(TP, 11)
    t.done(TP, 12)
    assert t.committable() == {}  # 10 is not done: nothing may be committed
    t.done(TP, 10)
    assert t.committable() == {TP: 13}
    t.mark_committed({TP: 13})
    assert t.committable() == {}
    t.done(TP, 13)
    assert t.committable() == {TP: 14} and t.in_flight == 0


def test_gaps_in_offsets_are_followed() -> None:
    t = OffsetTracker()
    t.add(TP, [5, 9, 20])  # transaction markers / compaction leave gaps
    t.done(TP, 9)
    t.done(TP, 5)
    assert t.committable() == {TP: 10}
    t.done(TP, 20)
    assert t.committable() == {TP: 21}


def test_partitions_are_independent_and_forgotten_on_revoke() -> None:
    t = OffsetTracker()
    t.add(TP, [0, 1])
    t.add(TP2, [0])
    t.done(TP2, 0)
    assert t.committable() == {TP2: 1} and t.pending([TP]) == 2
    t.forget([TP])
    assert t.in_flight == 0 and t.committable() == {TP2: 1}
    t.done(TP, 0)  # a late completion for a revoked partition changes nothing
    assert t.committable() == {TP2: 1} and t.in_flight == 0


def test_done_twice_counts_once() -> None:
    t = OffsetTracker()
    t.add(TP, [0, 1])
    t.done(TP, 0)
    t.done(TP, 0)
    assert t.in_flight == 1


@given(st.integers(1, 200), st.randoms())
def test_any_completion_order_commits_exactly_the_done_prefix(n: int, rnd: random.Random) -> None:
    t = OffsetTracker()
    offsets = sorted(rnd.sample(range(1000), n))
    t.add(TP, offsets)
    order = offsets[:]
    rnd.shuffle(order)
    finished: set[int] = set()
    for off in order:
        t.done(TP, off)
        finished.add(off)
        prefix = 0
        while prefix < n and offsets[prefix] in finished:
            prefix += 1
        expected = {TP: offsets[prefix - 1] + 1} if prefix else {}
        assert t.committable() == expected
    assert t.in_flight == 0
