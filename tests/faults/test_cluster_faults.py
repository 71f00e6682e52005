"""Fault scenarios on three brokers: the session's `kafka3` cluster (LocalKafkaCluster, three KRaft
nodes, each broker and controller), topics with three replicas and min.insync.replicas=2, the dev
KMS, two enclave workers and host processes from signer/topology.py, under a steady load.

Every scenario ends with the same accounting (tests/faults/kit.py): every request id answered,
its results identical but for their timings (byte-identical signed content), every request `ok`
with a signature that recovers its key's address (eth-account), and the group's committed offset
at the log end of every request partition. Each scenario also asserts that its fault hit work:
results were produced before and after it, the killed broker led partitions that moved, the
hosts were rebalanced, ...

Faults are injected once a number of results has been seen, never after a fixed sleep. The
scenarios run by default are the SIGKILL of partition leaders (requests, then results),
consumer-group churn and exactly-once through a SIGKILL of the transaction coordinator; the
rolling restart of all three brokers runs with SIGNER_LONG_FAULTS=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from broker.kafka_cluster import LocalKafkaCluster
from broker.topics import TopicLayout
from tests.faults.kit import (
    LONG,
    LONG_REASON,
    Collector,
    Load,
    Stage,
    Supervisor,
    account,
    host_signed,
    log_events,
    new_stage,
    populate,
    record,
    request,
    wait_all_committed,
)


@pytest.fixture
def layout3(layout: TopicLayout) -> TopicLayout:
    """The test's own topics: 8 request partitions (four hosts get two each), 3 result partitions."""
    return replace(layout, request_partitions=8, result_partitions=3)


@pytest.fixture
async def stage3(
    tmp_path: Path, sock_dir: Path, kafka3: LocalKafkaCluster, layout3: TopicLayout
) -> AsyncIterator[Stage]:
    """A stage over the three brokers, nothing started (tests populate it). Its processes are
    stopped by pid at the end, and every broker a test stopped is running again."""
    stage = new_stage(tmp_path, sock_dir, kafka3.bootstrap, layout3)
    try:
        await asyncio.to_thread(_all_running, kafka3)
        yield stage
    finally:
        with contextlib.suppress(Exception):
            await stage.topology.aclose(kill=True)
        await asyncio.to_thread(_all_running, kafka3)


def _all_running(kafka3: LocalKafkaCluster) -> None:
    for n in kafka3.nodes:
        if not n.running:
            kafka3.start_node(n.index)
    kafka3.wait_in_sync(None, 90)


def topics(stage: Stage) -> list[str]:
    return [t.name for t in stage.layout.new_topics()]


class Run:
    """A stream of requests at `rate`, the results collector, and the bookkeeping of one scenario."""

    def __init__(self, stage: Stage, kafka3: LocalKafkaCluster, rate: float = 250, isolation: str = "read_uncommitted"):
        self.stage, self.kafka3, self.rate = stage, kafka3, rate
        self.col = Collector(kafka3.bootstrap, stage.layout, isolation)
        self.load = Load(kafka3.bootstrap, stage.layout.requests, stage.layout.request_partitions)
        self.sent: list[dict[str, Any]] = []
        self.sup = Supervisor(stage)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.t0 = time.monotonic()

    async def __aenter__(self) -> Run:
        await self.sup.__aenter__()
        await self.col.__aenter__()
        await self.load.__aenter__()
        self._task = asyncio.create_task(
            self.load.stream(lambda i: request(self.stage, i, "c"), self.rate, self._stop, self.sent), name="stream"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self.load.__aexit__()
        await self.col.__aexit__()
        await self.sup.__aexit__()

    async def more(self, n: int, timeout: float = 120) -> int:
        """Wait for n more results than seen now; the count reached."""
        target = self.col.total + n
        await self.col.wait_results(target, timeout)
        return self.col.total

    async def finish(self, timeout: float = 180) -> None:
        """Stop the stream; wait until every request is answered and every offset committed."""
        self._stop.set()
        assert self._task is not None
        await self._task
        await self.col.wait_ids({r["request_id"] for r in self.sent}, timeout)
        await wait_all_committed(self.kafka3.bootstrap, self.stage.group, self.stage.layout, timeout=90)


def now_ms() -> int:
    return int(time.time() * 1000)


def leaders(kafka3: LocalKafkaCluster, topic: str) -> dict[int, int]:
    """{partition: node index of its leader}, from a running node's metadata."""
    md = kafka3.metadata([topic])
    return {p: kafka3.index_of(s.leader) for p, s in md.topics[topic].items() if s.leader >= 0}


async def kill_leader_of(run: Run, topic: str) -> dict[str, Any]:
    """SIGKILL the node leading most partitions of `topic`, keep the load on until 300 more results
    are in, start it again and wait for every replica to be in sync. What happened, for the report."""
    kafka3 = run.kafka3
    led = await asyncio.to_thread(leaders, kafka3, topic)
    victim = max(range(len(kafka3.nodes)), key=lambda i: sum(1 for v in led.values() if v == i))
    owned = sorted(p for p, v in led.items() if v == victim)
    assert owned, f"node {victim} leads no partition of {topic}: {led}"
    before = run.col.total
    t_kill = now_ms()
    await asyncio.to_thread(kafka3.kill, victim)
    await run.more(300)  # the fault's work: results keep coming with the node dead
    moved = await asyncio.to_thread(leaders, kafka3, topic)
    assert all(moved.get(p) not in (None, victim) for p in owned), (victim, owned, moved)
    t_back = now_ms()
    await asyncio.to_thread(kafka3.start_node, victim)
    await asyncio.to_thread(kafka3.wait_in_sync, topics(run.stage), 90)
    return {"node": victim, "partitions": owned, "before": before, "t_kill": t_kill, "t_back": t_back}


async def test_sigkill_of_the_request_then_the_result_partitions_leader(
    stage3: Stage, kafka3: LocalKafkaCluster
) -> None:
    stage = stage3
    await populate(stage, ["h0", "h1"])
    await asyncio.to_thread(kafka3.wait_in_sync, topics(stage), 60)
    async with Run(stage, kafka3) as run:
        await run.more(400)
        first = await kill_leader_of(run, stage.layout.requests)
        await run.more(300)
        second = await kill_leader_of(run, stage.layout.results)
        await run.more(300)
        await run.finish()
    acc = account(run.sent, run.col, stage.addresses)
    for fault in (first, second):
        assert fault["before"] > 0
        assert run.col.produced_between(fault["t_kill"], fault["t_back"]) > 0  # produced while it was down
    after = run.col.produced_between(second["t_back"], now_ms() + 1)
    assert after > 0
    print(f"\nkilled node {first['node']} (led request partitions {first['partitions']}), then node "
          f"{second['node']} (led result partitions {second['partitions']}); {acc.results} results, "
          f"{acc.duplicates} duplicates, {after} results after the second restart")  # fmt: skip
    record("3 brokers: SIGKILL leader of request partitions, then of result partitions", acc,
           time.monotonic() - run.t0,
           f"node {first['node']} led requests {first['partitions']}, node {second['node']} led results "
           f"{second['partitions']}; results while each was down and after")  # fmt: skip
    run.sup.check()


async def test_hosts_scaled_1_to_4_to_1_under_load(stage3: Stage, kafka3: LocalKafkaCluster) -> None:
    stage, topo = stage3, stage3.topology
    await populate(stage, ["h0"])
    everything = stage.layout.request_partitions + 1  # and sign.admin's partition
    extra = ("h1", "h2", "h3")
    async with Run(stage, kafka3, rate=200) as run:
        await run.more(300)
        t_up = now_ms()
        for name in extra:
            await stage.start_host(name)
        # partitions moved: each new host signs requests (its metrics say so)
        signed = dict.fromkeys(extra, 0.0)
        async with asyncio.timeout(90):
            while min(signed.values()) == 0:
                await asyncio.sleep(0.2)  # polls the hosts' metrics
                for name in extra:
                    with contextlib.suppress(OSError, aiohttp.ClientError):  # restarting after a crash
                        signed[name] = await host_signed(topo.hosts[name].url)
        await run.more(400)
        t_down = now_ms()
        run.sup.expect_exit(*extra)
        codes = [await topo.hosts[name].process.astop() for name in extra]  # SIGTERM: drain, commit, leave
        assert codes == [0, 0, 0], codes
        await run.more(400)
        await run.finish()
    acc = account(run.sent, run.col, stage.addresses)
    run.sup.check()
    h0_assigned = [e["partitions"] for e in log_events(stage.log("h0"), "partitions_assigned")]
    assert h0_assigned[0] == everything and h0_assigned[-1] == everything, h0_assigned
    assert min(h0_assigned) <= everything // 4 + 1, f"h0 never shared its partitions: {h0_assigned}"
    assert len(h0_assigned) >= 3, h0_assigned  # one rebalance at least per step
    assert run.col.produced_between(t_up, t_down) > 0 and run.col.produced_between(t_down, now_ms() + 1) > 0
    print(f"\nh0 assignments {h0_assigned}; signed by h1-h3 when scaling up: {signed}; {acc.results} results, "
          f"{acc.duplicates} duplicates")  # fmt: skip
    record("3 brokers: hosts scaled 1 -> 4 -> 1 under load", acc, time.monotonic() - run.t0,
           f"h0 assignments {h0_assigned}; h1-h3 had signed {sorted(int(v) for v in signed.values())} when seen")  # fmt: skip
    run.sup.check()


@pytest.mark.skipif(not LONG, reason=LONG_REASON)
@pytest.mark.timeout(600)
async def test_rolling_restart_of_all_three_brokers(stage3: Stage, kafka3: LocalKafkaCluster) -> None:
    stage = stage3
    await populate(stage, ["h0", "h1"])
    await asyncio.to_thread(kafka3.wait_in_sync, topics(stage), 60)
    pids = [n.pid for n in kafka3.nodes]
    async with Run(stage, kafka3) as run:
        await run.more(400)
        t_start, before = now_ms(), run.col.total
        await asyncio.to_thread(kafka3.rolling_restart, topics(stage))
        t_done = now_ms()
        await run.more(300)
        await run.finish()
    acc = account(run.sent, run.col, stage.addresses)
    assert not set(pids) & {n.pid for n in kafka3.nodes}  # every node was restarted
    during = run.col.produced_between(t_start, t_done)
    assert before > 0 and during > 0 and run.col.produced_between(t_done, now_ms() + 1) > 0
    print(f"\nrolling restart took {(t_done - t_start) / 1000:.1f}s, {during} results during it; {acc.results} results, "
          f"{acc.duplicates} duplicates")  # fmt: skip
    record("3 brokers: rolling restart of all three", acc, time.monotonic() - run.t0,
           f"all 3 nodes restarted in {(t_done - t_start) / 1000:.0f}s, {during} results during it")  # fmt: skip
    run.sup.check()


async def transaction_coordinator(kafka3: LocalKafkaCluster, transactional_id: str) -> int:
    """The node index of the broker coordinating a transactional id (FindCoordinator, key type 1)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka3.bootstrap, client_id="fault-admin")
    await admin.start()
    try:
        return kafka3.index_of(await admin.find_coordinator(transactional_id, 1))
    finally:
        await admin.close()


async def test_exactly_once_through_a_sigkill_of_the_transaction_coordinator(
    stage3: Stage, kafka3: LocalKafkaCluster
) -> None:
    """SIGNER_EXACTLY_ONCE=true; the node that coordinates h0's transactions is SIGKILLed mid-load and
    started again. A read_committed consumer sees exactly one result per request."""
    stage, topo = stage3, stage3.topology
    topo.host_settings["SIGNER_EXACTLY_ONCE"] = "true"
    topo.host_settings["SIGNER_TRANSACTION_TIMEOUT_MS"] = "10000"
    await populate(
        stage, ["h0", "h1"], per_host={n: {"SIGNER_TRANSACTIONAL_ID": f"{stage.group}-{n}"} for n in ("h0", "h1")}
    )
    await asyncio.to_thread(kafka3.wait_in_sync, None, 60)
    tx_id = f"{stage.group}-h0"
    async with Run(stage, kafka3, isolation="read_committed") as run:
        await run.more(400)
        victim = await transaction_coordinator(kafka3, tx_id)
        before, t_kill = run.col.total, now_ms()
        await asyncio.to_thread(kafka3.kill, victim)
        await run.more(300)
        t_back = now_ms()
        await asyncio.to_thread(kafka3.start_node, victim)
        await asyncio.to_thread(kafka3.wait_in_sync, None, 90)
        await run.more(300)
        await run.finish()
    acc = account(run.sent, run.col, stage.addresses)
    assert acc.duplicates == 0, f"{acc.duplicates} results seen twice under read_committed"
    during = run.col.produced_between(t_kill, t_back)
    assert before > 0 and during > 0 and run.col.produced_between(t_back, now_ms() + 1) > 0
    print(f"\nkilled node {victim} (coordinator of {tx_id}); {during} committed results while it was down; "
          f"{acc.results} results, no duplicates")  # fmt: skip
    record("3 brokers, exactly-once: SIGKILL of h0's transaction coordinator (read_committed)", acc,
           time.monotonic() - run.t0, f"node {victim} coordinated h0's transactions; {during} results while down")  # fmt: skip
    run.sup.check()
