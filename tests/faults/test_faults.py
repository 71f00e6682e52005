"""Fault injection: the real cluster (its own Kafka broker, the dev KMS, two enclave and two host
processes) under steady load, one fault per scenario.

Every scenario ends with the accounting of tests/faults/kit.py: every valid request (made by
kit.request) ends `ok` with a signature that recovers its key's address (eth-account), its
results are identical but for `timings_us` and `enclave_id` (kit.signed_part), no result names
an unknown id; every hostile input lands in the DLQ with its original bytes or, when it names a
request id the enclave refuses, gets a coded refusal. The end is a real signal, not a pause: the
group has committed every request partition to its log end (so every output is written) and the
collector has read the results and DLQ topics to their end offsets. Faults are injected once a
number of results has been collected. Each scenario also asserts that its fault hit work (from
results' `enclave_id` and Kafka timestamps, the hosts' /metrics and logs), that no host died (kit.Supervisor)
and that host memory stayed under a bound (sampled during the run). A summary table is written to
$SIGNER_ARTIFACTS (default ./artifacts)/faults-summary.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiokafka import AIOKafkaProducer

from broker.topics import TopicLayout
from schemas.transport import UnixTransport, transport_for
from signer.topology import Topology
from tests.faults import kit
from tests.faults.kit import Collector, Load, Stage, Supervisor, log_events, metric, populate, scrape
from tests.transports import FaultyTransport

HOST_RSS_BOUND_KB = 500 * 1024
SUMMARY_FILE = "faults-summary.md"
HOSTILE = 100_000  # hostile records in the hostile-input scenario (about 7 s on 2 cores)


@pytest.fixture
async def stage(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Stage]:
    """Its own Kafka broker (one scenario restarts it), the dev KMS, enclaves e0 and e1, hosts h0 and h1,
    six keys in three keyrings; everything is set up inside the scope that stops it (by pid)."""
    layout = TopicLayout(request_partitions=6, result_partitions=3)
    topo = Topology(tmp_path, sock_dir=sock_dir, log_dir=tmp_path, layout=layout, group_id=f"g-{layout.requests}",
                    host_settings=kit.HOST_SETTINGS, log_level="INFO")  # fmt: skip
    stage = Stage(topo)
    try:
        await topo.start_kafka()
        await populate(stage, ["h0", "h1"])
        yield stage
    finally:
        await topo.aclose(kill=True)


def now_ms() -> int:
    return int(time.time() * 1000)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` (a real signal: a counter, a log line) until it holds."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


class Watch:
    """Samples the hosts during a scenario: VmRSS from /proc, signer_in_flight and
    signer_paused_partitions from their /metrics."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.rss_peak_kb: dict[str, int] = {}
        self.in_flight_max = 0.0
        self.paused_max = 0.0
        self.scrapes = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._run(), name="watch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.sample_rss()

    def sample_rss(self) -> None:
        for name, host in list(self.topo.hosts.items()):
            if host.process.running:
                rss = kit.rss_kb(host.process.pid)
                self.rss_peak_kb[name] = max(self.rss_peak_kb.get(name, 0), rss)

    async def _run(self) -> None:
        while True:
            self.sample_rss()
            for host in list(self.topo.hosts.values()):
                if not host.process.running:
                    continue
                with contextlib.suppress(OSError, aiohttp.ClientError, TimeoutError, AssertionError):
                    text = await scrape(host.url, timeout=2)
                    self.scrapes += 1
                    self.in_flight_max = max(self.in_flight_max, metric(text, "signer_in_flight"))
                    self.paused_max = max(self.paused_max, metric(text, "signer_paused_partitions"))
            await asyncio.sleep(0.2)  # the sampling period

    @property
    def rss_peak_mib(self) -> int:
        return max(self.rss_peak_kb.values(), default=0) // 1024


@dataclass
class Hostile:
    """A hostile record value; `rid` is the request id the host's decoder reads from it, if any (it
    may then get a coded refusal instead of a DLQ record)."""

    raw: bytes
    rid: str | None = None


@dataclass
class Run:
    """One scenario under way: the load, the collector, the samplers and what the fault noted."""

    stage: Stage
    col: Collector
    load: Load
    sup: Supervisor
    watch: Watch
    reqs: list[dict[str, Any]]
    marks: dict[str, int] = field(default_factory=dict)  # wall clock ms of the fault's steps
    notes: dict[str, Any] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)  # processes the fault ended for good

    @property
    def topo(self) -> Topology:
        return self.stage.topology

    def mark(self, what: str) -> None:
        self.marks[what] = now_ms()

    async def kill(self, name: str) -> None:
        if name in self.topo.hosts:
            self.sup.expect_exit(name)
        await self.topo.process(name).astop(signal.SIGKILL, timeout=10)
        self.killed.add(name)

    def signed_by(self, enclave: str, sent_from: int = 0, sent_to: int = 2**63) -> list[kit.Result]:
        """`ok` results signed by `enclave` for valid requests sent in [sent_from, sent_to)."""
        sent = self.load.sent_ms
        return [r for req in self.reqs for r in self.col.results.get(req["request_id"], [])
                if r.value.get("enclave_id") == enclave and r.value.get("status") == "ok"
                and sent_from <= sent[req["request_id"]] < sent_to]  # fmt: skip

    def channel_lost(self, enclave: str, skip: int = 0) -> int:
        """channel_lost lines for `enclave`'s socket in the hosts' logs (after the first `skip` of each)."""
        sock = f"/{enclave}.sock"
        return sum(len([e for e in log_events(self.stage.log(h), "channel_lost") if sock in e.get("channel", "")][skip:])
                   for h in self.topo.hosts)  # fmt: skip

    async def host_metric(self, name: str, **labels: str) -> float:
        """`name` summed over the running hosts' /metrics."""
        texts = [await scrape(h.url) for h in self.topo.hosts.values() if h.process.running]
        return sum(metric(t, name, **labels) for t in texts)


Fault = Callable[[Run], Awaitable[None]]
Hit = Callable[[Run], Awaitable[tuple[str, dict[str, bool]]]]  # -> (what the summary says, claims that must hold)


async def send_hostile(bootstrap: str, topic: str, partitions: int, values: list[Hostile], seconds: float) -> None:
    """Produce `values` in 50 chunks spread over `seconds` (batched: linger, large batches)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id="fault-hostile", acks="all",
                                linger_ms=50, max_batch_size=512 * 1024, request_timeout_ms=60_000)  # fmt: skip
    await producer.start()
    try:
        chunk = max(1, len(values) // 50)
        t0 = time.monotonic()
        acks = []
        for start in range(0, len(values), chunk):
            delay = t0 + seconds * start / len(values) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the pacing of the chunks
            for i in range(start, min(start + chunk, len(values))):
                acks.append(await producer.send(topic, values[i].raw, partition=i % partitions))
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


def check_hostile(hostile: list[Hostile], col: Collector) -> tuple[int, int, int]:
    """Every hostile record in the DLQ with its original bytes, or refused with a code under the id
    it names (and, when refused for what it is rather than for its key or auth, in the DLQ as well);
    every DLQ record is one of them. -> (refused with a result, results, lost)."""
    originals = Counter(bytes(d["original"]) for d in col.dlq if d.get("original") is not None)
    refused = results = lost = 0
    for h in hostile:
        got = col.results.get(h.rid, []) if h.rid else []
        if got:
            assert len({kit.signed_part(r.value) for r in got}) == 1, (h.rid, [r.value for r in got])
            res = got[0].value
            assert res["status"] != "ok" and (res.get("error") or {}).get("code"), (h.rid, res)
            refused += 1
            results += len(got)
            if originals[h.raw] > 0:  # refused for what it is (not for its key or auth): in the DLQ too
                originals[h.raw] -= 1
        elif originals[h.raw] > 0:
            originals[h.raw] -= 1
        else:
            lost += 1
    left = +originals
    assert not left, f"{sum(left.values())} DLQ records that are no hostile input, e.g. {list(left)[:2]}"
    return refused, results, lost


async def run_scenario(stage: Stage, name: str, fault: Fault, hit: Hit, *, n: int = 1500, rate: float = 300,
                       at: int | None = None, hostile: list[Hostile] | None = None) -> Run:  # fmt: skip
    """`n` valid requests at `rate` a second (and `hostile` records interleaved over the same time);
    the fault once `at` results (default n/3) are in; then the end (everything committed and read),
    the summary row, the accounting, the fault's claims."""
    layout, hostile = stage.layout, hostile or []
    bootstrap = stage.topology.bootstrap
    reqs = kit.requests(stage, n, "s")
    t0 = time.monotonic()
    async with (
        Supervisor(stage) as sup,
        Watch(stage.topology) as watch,
        Collector(bootstrap, layout) as col,
        Load(bootstrap, layout.requests, layout.request_partitions) as load,
    ):
        run = Run(stage, col, load, sup, watch, reqs)
        producing = [load.start(reqs, rate)]
        if hostile:
            producing.append(asyncio.create_task(
                send_hostile(bootstrap, layout.requests, layout.request_partitions, hostile, n / rate)))  # fmt: skip
        try:
            await col.wait_results(n // 3 if at is None else at)
            await fault(run)
            await asyncio.gather(*producing)
        finally:
            for task in producing:
                task.cancel()
            await asyncio.gather(*producing, return_exceptions=True)
        await kit.wait_all_committed(bootstrap, stage.group, layout, timeout=180)
        await col.read_to_end()
        seconds = time.monotonic() - t0
        text, claims = await hit(run)
    acc = kit.tally(reqs, col)
    named = {h.rid for h in hostile if h.rid}
    refused = hostile_results = hostile_lost = 0
    if hostile:
        refused, hostile_results, hostile_lost = check_hostile(hostile, col)
    failed = [c for c, ok in claims.items() if not ok]
    row = replace(acc, requests=acc.requests + len(hostile), results=acc.results + hostile_results,
                  lost=acc.lost + hostile_lost)  # fmt: skip
    kit.record(name, row, seconds, text + "".join(f"; NOT: {c}" for c in failed), file=SUMMARY_FILE,
               extra={"DLQ": len(col.dlq), "hostile refused": refused,
                      "host RSS peak, MiB": watch.rss_peak_mib})  # fmt: skip
    kit.account(reqs, col, stage.addresses, others=named, dlq=bool(hostile))
    assert hostile_lost == 0, f"{hostile_lost} hostile records with neither a DLQ record nor a result"
    assert not failed, f"the fault did not hit work: {failed} ({text})"
    sup.check()
    for ename, enclave in stage.topology.enclaves.items():
        assert ename in run.killed or enclave.process.running, f"{ename} exited"
    assert watch.rss_peak_kb and max(watch.rss_peak_kb.values()) < HOST_RSS_BOUND_KB, watch.rss_peak_kb
    return run


# -- the scenarios -------------------------------------------------------------------------------------


async def test_sigkill_of_a_host(stage: Stage) -> None:
    every = stage.layout.request_partitions + 1  # and sign.admin's one partition

    async def fault(run: Run) -> None:
        run.notes["h1 assignments"] = len(log_events(stage.log("h1"), "partitions_assigned"))
        await run.kill("h0")
        run.mark("kill")

    async def hit(run: Run) -> tuple[str, dict[str, bool]]:
        after = [e["partitions"] for e in log_events(stage.log("h1"), "partitions_assigned")]
        after = after[run.notes["h1 assignments"] :]
        later = run.col.produced_between(run.marks["kill"], now_ms() + 1)
        return f"h1 assigned {after} partitions after the kill; {later} results after it", {
            "results produced after the kill": later > 0,
            f"h1 assigned all {every} partitions after the kill": every in after,
        }

    await run_scenario(stage, "SIGKILL host", fault, hit)


async def test_sigkill_of_an_enclave(stage: Stage) -> None:
    async def fault(run: Run) -> None:
        run.notes["lost before"] = run.channel_lost("e0")
        await run.kill("e0")
        run.mark("kill")

    async def hit(run: Run) -> tuple[str, dict[str, bool]]:
        kill = run.marks["kill"]
        before = sum(1 for r in run.signed_by("e0") if r.timestamp_ms < kill)
        after = len(run.signed_by("e0", sent_from=kill))
        redispatched = await run.host_metric("signer_redispatched_requests_total")
        lost = run.channel_lost("e0", run.notes["lost before"])
        return f"e0 signed {before} before the kill, {after} sent after; {redispatched:.0f} re-dispatched, " \
               f"{lost} channel_lost for e0", {
            "e0 signed results before the kill": before > 0,
            "e0 signed nothing sent after the kill": after == 0,
            "hosts re-dispatched or logged channel_lost for e0": redispatched > 0 or lost > 0,
        }  # fmt: skip

    await run_scenario(stage, "SIGKILL enclave", fault, hit)


async def test_sigstop_of_an_enclave(stage: Stage) -> None:
    async def fault(run: Run) -> None:
        run.notes["lost before"] = run.channel_lost("e1")
        run.topo.enclaves["e1"].process.send_signal(signal.SIGSTOP)
        run.mark("stop")
        await asyncio.sleep(4)  # the fault's length: longer than the hosts' 2 s dead-after
        run.topo.enclaves["e1"].process.send_signal(signal.SIGCONT)
        run.mark("cont")

    async def hit(run: Run) -> tuple[str, dict[str, bool]]:
        stop, cont = run.marks["stop"], run.marks["cont"]
        during = sum(1 for r in run.signed_by("e1", sent_from=stop) if r.timestamp_ms < cont)
        again = len(run.signed_by("e1", sent_from=cont))
        lost = run.channel_lost("e1", run.notes["lost before"])
        return f"e1 signed {during} during the stop, {again} sent after SIGCONT; {lost} channel_lost for e1", {
            "e1 signed nothing during the stop": during == 0,
            "e1 signs again after SIGCONT": again > 0,
            "the hosts logged e1's channel lost": lost > 0,
        }

    # 10 s of load: the 4 s stop starts a third of the way in, and work is left for e1 after it
    await run_scenario(stage, "SIGSTOP enclave 4 s", fault, hit, n=3000)


async def test_kafka_broker_restart(stage: Stage) -> None:
    kafka = stage.topology.kafka
    assert kafka is not None

    async def fault(run: Run) -> None:
        run.mark("stop")
        await asyncio.to_thread(kafka.stop)
        await asyncio.to_thread(kafka.start)
        run.mark("start")

    async def hit(run: Run) -> tuple[str, dict[str, bool]]:
        before = run.col.produced_between(0, run.marks["stop"])
        after = run.col.produced_between(run.marks["start"], now_ms() + 1)
        down = (run.marks["start"] - run.marks["stop"]) / 1000
        return f"broker down {down:.1f}s; {before} results before the stop, {after} after the start", {
            "results before the stop": before > 0,
            "results after the start": after > 0,
        }

    await run_scenario(stage, "Kafka broker restart", fault, hit)


async def test_kms_down_then_back(stage: Stage) -> None:
    topo = stage.topology

    async def fault(run: Run) -> None:
        await topo.stop_kms()
        run.mark("kms down")
        await run.kill("e0")  # a fresh enclave process has no data key cached: it needs KMS
        run.mark("kill")
        run.killed.discard("e0")
        await topo.start_enclave("e0")
        await asyncio.sleep(3)  # the fault's length: KMS stays down with e0 serving
        await topo.start_kms()  # at the same address (the port it had): the enclave configuration names it
        run.mark("kms back")

    async def hit(run: Run) -> tuple[str, dict[str, bool]]:
        new = run.signed_by("e0", sent_from=run.marks["kill"])
        early = sum(1 for r in new if r.timestamp_ms < run.marks["kms back"])
        return f"the new e0 signed {len(new)}, {early} of them before KMS was back", {
            "the new e0 signs results": len(new) > 0,
            "all of them after KMS is back": early == 0,
        }

    # 10 s of load: work for the new e0 remains once KMS is back
    await run_scenario(stage, "KMS down 3 s (cold enclave)", fault, hit, n=3000)


async def test_kms_throttling(stage: Stage) -> None:
    topo = stage.topology

    async def fault(run: Run) -> None:
        await run.kill("e1")  # cold again: its keyrings must be unwrapped under throttling
        run.killed.discard("e1")
        async with aiohttp.ClientSession() as s:  # after the kill: the old e1 cannot take the throttles
            await s.post(f"{topo.kms_url}/_dev/throttle", json={"next": 8})
        await topo.start_enclave("e1")
        run.mark("restart")

    async def hit(run: Run) -> tuple[str, dict[str, bool]]:
        # whichever enclave asks KMS next is throttled: the new e1 unwrapping its keyrings, or e0
        # unwrapping those of e1's requests it took over. Enclaves report their counters with each
        # pong: wait for a report that has all 8 throttles the KMS served.
        async with aiohttp.ClientSession() as s, s.get(f"{topo.kms_url}/_dev/stats") as resp:
            served = (await resp.json())["throttled"]
        per_enclave: dict[str, float] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                while sum(per_enclave.values()) < served:
                    await asyncio.sleep(0.2)  # polls the hosts' metrics
                    texts = [await scrape(h.url) for h in topo.hosts.values()]
                    per_enclave = {e: max(metric(t, "signer_enclave_kms_throttles_total", enclave=e) for t in texts)
                                   for e in topo.enclaves}  # fmt: skip
        new = len(run.signed_by("e1", sent_from=run.marks["restart"]))
        seen = sum(per_enclave.values())
        return (
            f"KMS throttled {served} calls; signer_enclave_kms_throttles_total {per_enclave}; the new e1 signed {new}",
            {
                "KMS throttled 8 calls": served == 8,
                "signer_enclave_kms_throttles_total > 0 (the enclaves retried them)": seen > 0,
                "the new e1 signs results": new > 0,
            },
        )

    await run_scenario(stage, "KMS throttling (8 calls)", fault, hit)


async def test_producers_far_above_the_sustainable_rate(stage: Stage) -> None:
    # the hosts are restarted with a bound a burst of 8,000 surely reaches (two hosts drain a burst fast
    # enough that the suite's bound of 2,000 is not always reached)
    max_in_flight = 300.0
    for name in ("h0", "h1"):
        await stage.topology.hosts[name].process.astop()
    for name in ("h0", "h1"):
        await stage.start_host(name, {**kit.HOST_SETTINGS, "SIGNER_MAX_IN_FLIGHT": str(int(max_in_flight))})

    async def fault(run: Run) -> None:
        return None  # the fault is the load itself: a burst as fast as one producer can send

    async def hit(run: Run) -> tuple[str, dict[str, bool]]:
        w = run.watch
        # a host pauses (and logs it, with its in-flight count) at SIGNER_MAX_IN_FLIGHT; a pause can be
        # shorter than the interval between two scrapes of /metrics, so the log is the signal that counts
        pauses = [e for h in stage.topology.hosts for e in log_events(stage.log(h), "partitions_paused")]
        at_bound = [e for e in pauses if e.get("in_flight", 0) >= max_in_flight]
        return f"max signer_in_flight {w.in_flight_max:.0f}, max signer_paused_partitions {w.paused_max:.0f} " \
               f"({w.scrapes} scrapes); partitions_paused logged {len(pauses)}x", {
            "backpressure engaged: a host paused at SIGNER_MAX_IN_FLIGHT": bool(at_bound),
        }  # fmt: skip

    await run_scenario(stage, "burst: 8000 at producer speed", fault, hit, n=8000, rate=100_000, at=0)


async def test_a_link_that_corrupts_and_drops_bytes(stage: Stage) -> None:
    topo = stage.topology
    enclaves = topo.enclaves
    link = FaultyTransport(transport_for(enclaves["e0"].url))
    faulty = topo.sock_dir / "faulty.sock"
    relay = await link.relay(UnixTransport(str(faulty)))  # a proxy in front of e0
    try:
        proxied = f"unix://{faulty}"
        for name in ("h0", "h1"):  # the hosts reach e0 only through the faulty link
            await topo.hosts[name].process.astop()
        for name in ("h0", "h1"):
            await topo.start_host(name, enclaves=[proxied, enclaves["e1"].url])

        def lost_on_link() -> int:
            return sum(1 for h in ("h0", "h1") for e in log_events(stage.log(h), "channel_lost")
                       if "faulty.sock" in e.get("channel", ""))  # fmt: skip

        async def fault(run: Run) -> None:
            link.corrupt_next = True
            await until(lambda: lost_on_link() >= 1, 30, "the corrupted frame's channel_lost")
            await run.col.wait_results(run.col.total + 200)  # work flows again
            link.cut_next = True
            await until(lambda: link.cuts == 1, 30, "the cut")

        async def hit(run: Run) -> tuple[str, dict[str, bool]]:
            return f"{link.corrupted} corruption, {link.cuts} cut, {lost_on_link()} channel_lost on the link", {
                "one corruption and one cut": (link.corrupted, link.cuts) == (1, 1),
                "channel_lost logged for the link": lost_on_link() >= 1,
            }

        await run_scenario(stage, "link corrupts a byte, then drops mid-frame", fault, hit)
    finally:
        relay.close()
        await link.aclose()


# -- hostile input -----------------------------------------------------------------------------------

JUNK: tuple[Any, ...] = (True, 1.5, [1], {"a": 1}, -1)
FIELDS = ("v", "request_id", "key_id", "scheme", "payload", "deadline_ms", "reply_topic", "auth")


def hostile_inputs(stage: Stage, count: int, seed: int = 99) -> list[Hostile]:
    """`count` hostile record values: random bytes and mutated requests that are not msgpack, wrong
    types in every field, oversized records, and requests that decode but the enclave must refuse
    (deep typed data, an unknown key, a forged client signature). Every request id is unique."""
    rnd = random.Random(seed)
    keys = stage.keys
    out: list[Hostile] = []
    i = 0
    while len(out) < count:
        i += 1
        kind = i % 3
        if i % 2000 == 1:  # oversized: above the host's 256 KiB limit
            out.append(Hostile(b"\x00" * (300 * 1024) + i.to_bytes(4, "big")))
        elif i % 100 == 2:
            out.append(refused_request(keys, i))
        elif kind == 0:  # random bytes (kept when not msgpack)
            raw = rnd.randbytes(rnd.randint(1, 80))
            if not decodes(raw):
                out.append(Hostile(raw))
        elif kind == 1:  # a request with three bytes changed (kept when no longer msgpack)
            mutated = bytearray(msgpack.packb(kit.request(stage, i, "hm")))
            for _ in range(3):
                mutated[rnd.randrange(len(mutated))] = rnd.randrange(256)
            if not decodes(bytes(mutated)):
                out.append(Hostile(bytes(mutated)))
        else:  # a wrong type in one field
            field_name, junk = FIELDS[(i // 3) % len(FIELDS)], JUNK[(i // 24) % len(JUNK)]
            m = kit.request(stage, i, f"hw-{field_name}-")
            m[field_name] = junk
            out.append(Hostile(msgpack.packb(m), None if field_name == "request_id" else m["request_id"]))
    return out


def decodes(raw: bytes) -> bool:
    try:
        msgpack.unpackb(raw, raw=False)
    except Exception:
        return False
    return True


def refused_request(keys: list[dict[str, Any]], i: int) -> Hostile:
    """A request the schema accepts and the enclave must refuse, with a code."""
    rid = f"hr{i}"
    which = (i // 100) % 3
    if which == 0:
        deep: Any = {"v": 1}
        for _ in range(30):
            deep = {"n": deep}
        typed = {"types": {"EIP712Domain": [], "T": [{"name": "n", "type": "T"}]}, "primaryType": "T",
                 "domain": {}, "message": deep}  # fmt: skip
        m = {"v": 1, "request_id": rid, "key_id": keys[0]["key_id"], "scheme": "eth_typed_data", "payload": typed}
    elif which == 1:
        m = {"v": 1, "request_id": rid, "key_id": "k_ffffffffffffffffffff", "scheme": "secp256k1_digest",
             "payload": b"\1" * 32}  # fmt: skip
    else:
        m = {"v": 1, "request_id": rid, "key_id": keys[1]["key_id"], "scheme": "secp256k1_digest", "payload": b"\1" * 32,
             "auth": {"client_id": "mallory", "ts_ms": now_ms(), "nonce": b"n" * 16, "sig": b"s" * 64}}  # fmt: skip
    return Hostile(msgpack.packb(m), rid)


async def test_hostile_records_interleaved_with_good_load(stage: Stage) -> None:
    t0 = time.monotonic()
    hostile = hostile_inputs(stage, HOSTILE)
    made = time.monotonic() - t0

    async def fault(run: Run) -> None:
        return None  # the fault is the hostile records, interleaved from the start

    async def hit(run: Run) -> tuple[str, dict[str, bool]]:
        dlq = await run.host_metric("signer_dlq_records_total")
        refused = sum(1 for h in hostile if h.rid and h.rid in run.col.results)
        return f"{len(hostile)} hostile ({made:.1f}s to make): {dlq:.0f} DLQ records by the hosts' metrics, " \
               f"{refused} refused with a code; host RSS peak {run.watch.rss_peak_kb} kB", {
            "the hosts sent hostile records to the DLQ": dlq > 0,
            "the enclaves refused the ones that decode": refused > 0,
        }  # fmt: skip

    name = f"{len(hostile):,} hostile records interleaved with 1,500 good"
    await run_scenario(stage, name, fault, hit, hostile=hostile, at=0)
