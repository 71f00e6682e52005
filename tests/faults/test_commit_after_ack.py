"""The no-loss invariant, tested directly: a host commits a request partition's offset only past
records whose results the broker has acknowledged *to the host*.

A one-node Kafka (LocalKafkaCluster(brokers=1)) advertises a Kafka-protocol-aware proxy
(tests/faults/kafka_proxy.py) as its listener, so every connection of every client - the host's
producer and consumer included - goes through the proxy, which knows which result keys each
Produce carried and when the broker's answer was passed on to the host. A monitor reads the
group's committed offsets straight from the broker's own port (OffsetFetch, no proxy) every
50 ms and, after the test, checks every reading against what had been acknowledged by then:
every request record below a committed offset must have had its result acknowledged before the
offset was read.

- acks held: the host signs while the proxy holds its Produce responses; nothing commits past
  the acknowledged prefix, then everything commits once they are released;
- a failed acknowledgement: one Produce is written by the broker but answered with an error;
  the host stops without committing past it, and a restarted host signs everything again;
- lost acknowledgements: the connection is cut as the answers to written Produce requests come
  back; the idempotent producer retries, nothing is written twice or committed early;
- a stalled connection: one of two hosts' connections stop forwarding for 10 s (35 s with
  SIGNER_LONG_FAULTS=1) without closing, then come back: the other host takes over, nothing is
  lost, duplicates are identical but for their timings;
- a broker that answers nothing: one of two hosts' connections are cut and every new one it opens is
  accepted but never answered (not even ApiVersions) for 10 s (50 s with SIGNER_LONG_FAULTS=1): the
  other host takes over, the first survives it and serves again once the hole ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.kafka_cluster import LocalKafkaCluster
from broker.topics import TopicLayout
from tests.faults.kafka_proxy import KafkaProxy, committed_offsets, proxied_properties
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
)
from tests.faults.kit import requests as make_requests


class CommitMonitor:
    """Samples the group's committed offsets of the requests topic, straight from the broker, with
    the proxy's acknowledgement sequence number read right after each answer."""

    def __init__(self, proxy: KafkaProxy, broker: tuple[str, int], group: str, layout: TopicLayout) -> None:
        self.proxy, self.broker, self.group, self.layout = proxy, broker, group, layout
        self.samples: list[tuple[float, dict[int, int], int]] = []  # (monotonic, committed, ack_seq)
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CommitMonitor:
        self._task = asyncio.create_task(self._run(), name="commit-monitor")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                committed = await committed_offsets(*self.broker, self.group, self.layout.requests,
                                                    self.layout.request_partitions)  # fmt: skip
            except (OSError, RuntimeError, ValueError, TimeoutError):
                self.errors += 1
            else:
                committed = {p: max(0, c) for p, c in committed.items()}  # -1: nothing committed yet
                self.samples.append((time.monotonic(), committed, self.proxy.ack_seq))  # acks read *after* the offsets
            await asyncio.sleep(0.05)

    async def now(self) -> dict[int, int]:
        """The committed offsets now, 0 where there is none."""
        got = await committed_offsets(*self.broker, self.group, self.layout.requests, self.layout.request_partitions)
        return {p: max(0, c) for p, c in got.items()}

    def violations(self, placed: dict[int, dict[int, str]]) -> list[str]:
        """Readings that committed past a record whose result had not been acknowledged before."""
        inf = float("inf")
        # per partition: prefix[c] = the latest first-acknowledgement among the records below offset c
        prefix: dict[int, list[float]] = {}
        for p in range(self.layout.request_partitions):
            offsets = placed.get(p, {})
            worst, row = 0.0, [0.0]
            for off in range(max(offsets, default=-1) + 1):
                rid = offsets.get(off)
                seq = self.proxy.acked.get((self.layout.results, rid.encode())) if rid is not None else None
                worst = max(worst, inf if seq is None else float(seq))
                row.append(worst)
            prefix[p] = row
        out = []
        for t, committed, seq in self.samples:
            for p, c in committed.items():
                if c <= 0:
                    continue
                row = prefix.get(p, [0.0])
                if c >= len(row):
                    out.append(f"t={t:.2f} p{p}: committed {c} beyond the {len(row) - 1} records produced")
                elif row[c] > seq:
                    first = next(o for o in range(c) if row[o + 1] > seq)
                    out.append(f"t={t:.2f} p{p}: committed {c} while the result of offset {first} was unacknowledged")
        return out

    def committed_between(self, t0: float, t1: float) -> list[dict[int, int]]:
        return [c for t, c, _ in self.samples if t0 <= t <= t1]


@dataclass
class Proxied:
    proxy: KafkaProxy
    kafka: LocalKafkaCluster
    stage: Stage
    started: float = field(default_factory=time.monotonic)

    @property
    def broker(self) -> tuple[str, int]:
        node = self.kafka.nodes[0]
        return node.host, node.port

    def monitor(self) -> CommitMonitor:
        return CommitMonitor(self.proxy, self.broker, self.stage.group, self.stage.layout)

    async def wait_committed(self, monitor: CommitMonitor, ends: dict[int, int], timeout: float = 60) -> None:
        last: dict[int, int] = {}
        try:
            async with asyncio.timeout(timeout):
                while (last := await monitor.now()) != ends:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"committed {last}, log ends {ends} after {timeout}s") from None


@pytest.fixture
async def proxied(tmp_path: Path, sock_dir: Path, layout: TopicLayout) -> AsyncIterator[Proxied]:
    """A one-node Kafka reachable only through a KafkaProxy (its advertised listener), and a stage over
    it (nothing started: tests populate it with their hosts). Everything is stopped by pid at the end."""
    proxy = KafkaProxy()
    kafka: LocalKafkaCluster | None = None
    stage: Stage | None = None
    try:
        await proxy.start()
        kafka = LocalKafkaCluster(brokers=1, data_dir=tmp_path / "kafka", properties=proxied_properties(proxy.port))
        stage = new_stage(tmp_path, sock_dir, proxy.address, layout, settings={"SIGNER_COMMIT_INTERVAL_MS": "100"})
        await asyncio.to_thread(kafka.start)
        proxy.upstream = (kafka.nodes[0].host, kafka.nodes[0].port)
        md = await asyncio.to_thread(kafka.metadata)
        assert md.brokers == {1: ("127.0.0.1", proxy.port)}, md  # clients are sent to the proxy
        yield Proxied(proxy, kafka, stage)
    finally:
        if stage is not None:
            with contextlib.suppress(Exception):
                await stage.topology.aclose(kill=True)
        if kafka is not None:
            await asyncio.to_thread(kafka.stop)
        await proxy.aclose()


def ends_of(load: Load, partitions: int) -> dict[int, int]:
    ends = dict.fromkeys(range(partitions), 0)
    for p, off in load.placed.values():
        ends[p] = max(ends[p], off + 1)
    return ends


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await condition():  # noqa: ASYNC110 (polls a metrics endpoint)
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def test_offsets_are_committed_only_past_acknowledged_results(proxied: Proxied) -> None:
    px, stage, proxy = proxied, proxied.stage, proxied.proxy
    await populate(stage, ["h0"])
    host = stage.topology.hosts["h0"]
    warm, held = make_requests(stage, 300, "w"), make_requests(stage, 750, "h")
    parts = stage.layout.request_partitions
    t0 = time.monotonic()
    async with (
        Collector(proxy.address, stage.layout) as col,
        Load(proxy.address, stage.layout.requests, stage.layout.request_partitions) as load,
        px.monitor() as mon,
    ):
        # acknowledged as usual: everything commits
        await load.run(warm, rate=2000)
        await col.wait_ids({r["request_id"] for r in warm})
        await px.wait_committed(mon, ends_of(load, parts))
        base = await mon.now()
        assert sum(base.values()) == len(warm)
        signed_before = await host_signed(host.url)
        # the host's Produce responses held: it signs 750 more over ~5 s, none acknowledged
        proxy.hold_produce("signer-host")
        t_hold = time.monotonic()
        await load.run(held, rate=150)
        await wait_until(
            lambda: _signed_at_least(host.url, signed_before + len(held)), 60, "the host to sign every held request"
        )
        assert proxy.held() >= 1
        # nothing to wait for: what is checked is that no commit happens, over 20 commit intervals more
        await asyncio.sleep(2.0)
        t_release = time.monotonic()
        in_log = sum(1 for r in held if r["request_id"] in col.results)  # written, not yet acknowledged
        proxy.release()
        await col.wait_ids({r["request_id"] for r in warm + held})
        await px.wait_committed(mon, ends_of(load, parts))
    assert mon.violations(load.by_offset()) == []
    assert host.process.running
    during = mon.committed_between(t_hold, t_release)
    assert len(during) >= 50, f"only {len(during)} readings of the committed offsets while acks were held"
    assert all(c == base for c in during), f"committed moved while no result was acknowledged: {during[-1]}"
    assert proxy.errors == [], proxy.errors[:5]
    acc = account(warm + held, col, stage.addresses)
    print(f"\n{len(during)} readings over {t_release - t_hold:.1f}s of held acks; {in_log} of the held "
          f"results were already in the log; {proxy.held_total} Produce responses held")  # fmt: skip
    record("acks held 5 s under load (one host, proxied broker)", acc, time.monotonic() - t0,
           f"{len(held)} signed while held, {len(during)} offset readings stayed at {sum(base.values())}")  # fmt: skip


async def _signed_at_least(url: str, n: float) -> bool:
    return await host_signed(url) >= n


async def test_a_failed_acknowledgement_stops_the_host_short_of_it(proxied: Proxied) -> None:
    px, stage, proxy = proxied, proxied.stage, proxied.proxy
    await populate(stage, ["h0"])
    reqs = make_requests(stage, 1200, "f")
    t0 = time.monotonic()
    async with (
        Collector(proxy.address, stage.layout) as col,
        Load(proxy.address, stage.layout.requests, stage.layout.request_partitions) as load,
        px.monitor() as mon,
    ):
        # once 300 results are acknowledged, the host's next Produce is written by the broker but
        # answered CORRUPT_MESSAGE (not retriable: the producer fails the batch)
        fail = proxy.fail_produce("signer-host", after_acked=len(proxy.acked) + 300)
        loading = load.start(reqs, rate=300)
        first = stage.topology.hosts["h0"]
        code = await asyncio.to_thread(first.process.wait, 90)  # the host stops by itself
        at_exit = await mon.now()
        await loading
        assert code != 0, "the host kept running after a failed write"
        assert len(fail.failed) == 1
        failed = {k.decode() for (topic, _), keys in fail.failed[0].items() if topic == stage.layout.results
                  for k in keys if k is not None}  # fmt: skip
        assert failed, fail.failed
        for rid in failed:  # never committed past a result whose write failed
            p, off = load.placed[rid]
            assert off >= at_exit[p], (rid, p, off, at_exit)
        assert sum(max(c, 0) for c in at_exit.values()) < len(reqs)
        # a restarted host gets the uncommitted records again and signs them
        first.process.stop()
        await stage.start_host("h0")
        await col.wait_ids({r["request_id"] for r in reqs})
        await px.wait_committed(mon, ends_of(load, stage.layout.request_partitions))
    assert mon.violations(load.by_offset()) == []
    assert proxy.errors == [], proxy.errors[:5]
    acc = account(reqs, col, stage.addresses)
    redone = [rid for rid in failed if len(col.results[rid]) < 2]
    assert not redone, f"{len(redone)} results whose write failed were not written again: {redone[:5]}"
    print(f"\nhost exited {code}; {len(failed)} results in the failed Produce; committed at exit "
          f"{sum(at_exit.values())} of {len(reqs)}; {acc.duplicates} identical duplicates after the restart")  # fmt: skip
    record("failed Produce acknowledgement, host restarted", acc, time.monotonic() - t0,
           f"host exit {code} with {len(failed)} results unacknowledged, {sum(at_exit.values())} committed")  # fmt: skip


async def test_lost_acknowledgements_are_retried_without_duplicates(proxied: Proxied) -> None:
    """The answers to five of the host's Produce requests are lost (the broker wrote them; the
    connection closes as each answer comes back): the idempotent producer sends them again, the
    broker recognises them, and no result is in the log twice; nothing commits before its retry
    is acknowledged."""
    px, stage, proxy = proxied, proxied.stage, proxied.proxy
    await populate(stage, ["h0"])
    reqs = make_requests(stage, 1200, "l")
    t0 = time.monotonic()
    async with (
        Collector(proxy.address, stage.layout) as col,
        Load(proxy.address, stage.layout.requests, stage.layout.request_partitions) as load,
        px.monitor() as mon,
    ):
        loading = load.start(reqs, rate=300)
        await col.wait_results(200)
        proxy.cut_produce("signer-host", count=5)
        await loading
        await col.wait_ids({r["request_id"] for r in reqs})
        await px.wait_committed(mon, ends_of(load, stage.layout.request_partitions))
    assert mon.violations(load.by_offset()) == []
    assert proxy.errors == [], proxy.errors[:5]
    acc = account(reqs, col, stage.addresses)
    lost = {k.decode() for t, k in proxy.cut_keys if t == stage.layout.results}
    assert proxy.cuts == 5 and lost, (proxy.cuts, len(lost))
    assert acc.duplicates == 0, f"{acc.duplicates} results written twice"  # the retries were recognised
    assert stage.topology.hosts["h0"].process.running
    record("5 Produce answers lost (connection cut), idempotent retries", acc, time.monotonic() - t0,
           f"{proxy.cuts} connections cut with {len(lost)} results unacknowledged; none written twice")  # fmt: skip


@pytest.mark.parametrize(
    "stall_s", [10, pytest.param(35, marks=pytest.mark.skipif(not LONG, reason=LONG_REASON))], ids=lambda s: f"{s}s"
)
async def test_a_stalled_broker_connection_comes_back(proxied: Proxied, stall_s: int) -> None:
    """Every connection of one of two hosts stops forwarding, both ways, for `stall_s` seconds without
    closing (past the 6 s session timeout; 35 s is past the producer's 30 s request timeout too),
    then flows again. Requests keep coming until 400 more results are in after it."""
    px, stage, proxy = proxied, proxied.stage, proxied.proxy
    await populate(stage, ["h0", "h1"])
    sent: list[dict[str, Any]] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    async with (
        Supervisor(stage) as sup,
        Collector(proxy.address, stage.layout) as col,
        Load(proxy.address, stage.layout.requests, stage.layout.request_partitions) as load,
        px.monitor() as mon,
    ):
        streaming = asyncio.create_task(load.stream(lambda i: request(stage, i, "s"), 200, stop, sent))
        await col.wait_results(400)
        h0 = stage.topology.hosts["h0"].process
        stalled = proxy.stall({h0.pid})
        stall_ms = int(time.time() * 1000)
        assert stalled >= 2, f"{stalled} connections of h0 found"  # its consumer's and its producer's at least
        await asyncio.sleep(stall_s)  # the fault itself: this long without a byte
        h0_url = stage.topology.hosts["h0"].url
        signed_in_stall = await host_signed(h0_url)  # its HTTP endpoint is not behind the proxy
        proxy.resume()
        resume_ms = int(time.time() * 1000)
        await col.wait_results(col.total + 400)
        stop.set()
        await streaming
        await col.wait_ids({r["request_id"] for r in sent})
        await px.wait_committed(mon, ends_of(load, stage.layout.request_partitions))
        signed_after = None  # what h0 signed after the stall (unknown if it was restarted)
        if stage.topology.hosts["h0"].url == h0_url:
            signed_after = int(await host_signed(h0_url) - signed_in_stall)
    assert mon.violations(load.by_offset()) == []
    assert proxy.errors == [], proxy.errors[:5]
    acc = account(sent, col, stage.addresses)
    sup.check()  # both hosts came through it (but for the known lag-loop crash, after which one is restarted)
    everything = stage.layout.request_partitions + 1  # the request partitions and sign.admin's
    took_over = [e["partitions"] for e in log_events(stage.log("h1"), "partitions_assigned")]
    assert everything in took_over, f"h1 never owned every partition: {took_over}"
    during = col.produced_between(stall_ms + 7000, resume_ms)
    after = col.produced_between(resume_ms, resume_ms + 600_000)
    assert during > 0 and after > 0, (during, after)
    print(f"\n{stalled} connections stalled; h1 assignments {took_over}; {during} results in the stall after h1 "
          f"took over, {after} after; h0 signed {signed_after} after it; {acc.duplicates} duplicates "
          f"({acc.identical_records} whole-record identical)")  # fmt: skip
    record(f"h0's broker connections stalled {stall_s} s (two hosts)", acc, time.monotonic() - t0,
           f"{stalled} connections stalled; h1 took all {everything} partitions; {during} results late in the "
           f"stall; h0 signed {signed_after} after it")  # fmt: skip
    sup.check()


API_VERSIONS = 18  # the first request of every new Kafka connection


async def _assigned_after(stage: Stage, host: str, seen: int, want: Callable[[int], bool]) -> bool:
    """Whether `host` logged a partitions_assigned (beyond its first `seen` ones) whose count `want`s."""
    events = log_events(stage.log(host), "partitions_assigned")[seen:]
    return any(want(e["partitions"]) for e in events)


@pytest.mark.parametrize(
    "hole_s", [10, pytest.param(50, marks=pytest.mark.skipif(not LONG, reason=LONG_REASON))], ids=lambda s: f"{s}s"
)
async def test_a_broker_that_answers_nothing_on_new_connections(proxied: Proxied, hole_s: int) -> None:
    """Two hosts under load; once 400 results are in, h0's broker connections are cut and every new
    connection it opens is accepted and read but never answered - not even ApiVersions, the first
    request of a Kafka connection - for `hole_s` seconds (50 s: past the producer's 30 s and the
    consumer's 40 s request timeouts, so h0 gives up on connections and opens new ones into the hole).
    Then the hole ends: its connections are closed and new ones reach the broker. h1 takes every
    partition in the hole, h0 survives it, rejoins and serves again; nothing is lost, no commit passes
    an unacknowledged result."""
    px, stage, proxy = proxied, proxied.stage, proxied.proxy
    await populate(stage, ["h0", "h1"])
    everything = stage.layout.request_partitions + 1  # the request partitions and sign.admin's
    sent: list[dict[str, Any]] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    async with (
        Supervisor(stage) as sup,
        Collector(proxy.address, stage.layout) as col,
        Load(proxy.address, stage.layout.requests, stage.layout.request_partitions) as load,
        px.monitor() as mon,
    ):
        streaming = asyncio.create_task(load.stream(lambda i: request(stage, i, "b"), 200, stop, sent))
        await col.wait_results(400)
        h0 = stage.topology.hosts["h0"]
        h1_seen = len(log_events(stage.log("h1"), "partitions_assigned"))
        signed_before = await host_signed(h0.url)  # its HTTP endpoint is not behind the proxy
        t_hole, hole_ms = time.monotonic(), int(time.time() * 1000)
        cut = proxy.black_hole({h0.process.pid})
        assert cut >= 2, f"{cut} connections of h0 found"  # its consumer's and its producer's at least
        # in the hole: h1 takes every partition once h0's session times out, h0 dials into the hole
        await wait_until(lambda: _assigned_after(stage, "h1", h1_seen, lambda n: n == everything), hole_s,
                         "h1 to take every partition in the hole")  # fmt: skip
        took_over_s = time.monotonic() - t_hole
        await wait_until(_true_when(lambda: proxy.holed_requests[API_VERSIONS] > 0), hole_s,
                         "h0 to open a connection into the hole")  # fmt: skip
        await asyncio.sleep(max(0.0, t_hole + hole_s - time.monotonic()))  # the fault itself: this long
        assert h0.process.running, f"h0 exited in the hole: {stage.log('h0')[-1500:]}"
        holed, swallowed = len(proxy.holed_conns), dict(proxy.holed_requests)
        h0_seen = len(log_events(stage.log("h0"), "partitions_assigned"))
        signed_in_hole = await host_signed(h0.url)
        closed = proxy.end_black_hole()
        end_ms = int(time.time() * 1000)
        # h0 back: it rejoins the group, gets partitions, and signs requests of them
        await wait_until(lambda: _assigned_after(stage, "h0", h0_seen, lambda n: n > 0), 60,
                         "h0 to be assigned partitions after the hole")  # fmt: skip
        back_s = time.monotonic() - t_hole - hole_s
        signed_at_rejoin = await host_signed(h0.url)
        stale = int(signed_at_rejoin - signed_in_hole)  # before the rejoin: from its old positions, if any
        signed_in_hole = int(signed_in_hole - signed_before)
        await wait_until(lambda: _signed_at_least(h0.url, signed_at_rejoin + 1), 60, "h0 to sign after rejoining")
        await col.wait_results(col.total + 400)
        stop.set()
        await streaming
        await col.wait_ids({r["request_id"] for r in sent})
        await px.wait_committed(mon, ends_of(load, stage.layout.request_partitions))
        signed_after = int(await host_signed(h0.url) - signed_at_rejoin)
    assert mon.violations(load.by_offset()) == []
    assert proxy.errors == [], proxy.errors[:5]
    acc = account(sent, col, stage.addresses)
    sup.check()  # neither host died, in the hole or after it
    during = col.produced_between(hole_ms + int(took_over_s * 1000), end_ms)
    assert during > 0, "no result produced in the hole after h1 took over"
    assert signed_after > 0
    if hole_s > 40:  # both clients' first connection into the hole timed out, and they dialled into it again
        assert holed >= 3, f"{holed} connections into the hole: h0 never dialled again after a request timeout"
    redone = [r["request_id"] for r in sent if len(col.results[r["request_id"]]) > 1]
    redone_before = sum(1 for rid in redone if load.sent_ms[rid] < hole_ms)
    print(f"\n{cut} connections of h0 cut; {holed} new ones black-holed, requests swallowed by api key "
          f"{swallowed}; h1 took all {everything} partitions {took_over_s:.1f}s into the hole; {during} results "
          f"after that in the hole; h0 signed {signed_in_hole} in the hole; {closed} holed connections closed at the "
          f"end; h0 signed {stale} before its new assignment, {back_s:.1f}s after the hole, and {signed_after} "
          f"since; {acc.duplicates} duplicates ({redone_before} of the {len(redone)} ids redone sent before the "
          f"hole) "
          f"({acc.identical_records} whole-record identical)")  # fmt: skip
    record(f"h0's new broker connections answered nothing for {hole_s} s (two hosts)", acc, time.monotonic() - t0,
           f"{cut} connections cut, {holed} opened into the hole ({swallowed.get(API_VERSIONS, 0)} ApiVersions "
           f"unanswered); h1 took all {everything} partitions after {took_over_s:.1f}s; {during} results in the "
           f"hole after that; h0 signed {stale} before its new assignment {back_s:.1f}s after it, {signed_after} "
           f"after")  # fmt: skip


def _true_when(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return condition()

    return check
