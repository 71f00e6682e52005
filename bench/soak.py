"""`python -m bench soak --minutes N [--out DIR]`: does the cluster hold steady for N minutes under
load and faults, or does memory or latency drift?

The cluster: a three-broker LocalKafkaCluster (topics with three replicas, min.insync.replicas=2),
one dev KMS, two enclave workers (e0, e1) and two `signer host` processes (h0, h1). The load is
`secp256k1_digest` only (one signature per request), over 8 keys in 4 keyrings:

1. the closed-loop maximum, briefly (a warm-up, then 4,000 outstanding, as `bench profile` does);
2. an open loop at 60% of it for N minutes, request n sent at t0 + n / rate to request partition
   n mod P; latency counts from that intended send time (coordinated-omission-safe);
3. a fault every `--fault-every` seconds (default 180; fewer seconds on a short run, so that the
   three kinds fit), in rotation: SIGKILL of the broker leading most request partitions (started
   again after 10 s, then every replica back in sync), SIGKILL of host h1 (started again after
   5 s), SIGKILL of enclave e1 (started again after 3 s). Faults fall in the middle three fifths
   of the run only, so that the first and the last fifth compare the cluster, not a fault;
   h0 and e0 are never killed and are the memory witnesses;
4. every 5 s: results per second, p99 over the window, RSS (VmRSS) of each host, enclave and broker;
5. at the end: every open-loop request id answered? (lost = acknowledged sends minus ids answered),
   duplicates (results beyond the first for an id), read once the group has committed every
   request and the results topic is read to its end offsets.

Drift: the mean of the first fifth against the mean of the last fifth of the run, for the RSS of
h0 and e0 (drift: more than DRIFT_RSS_PCT % and more than DRIFT_RSS_MIB MiB of growth) and the
window p99 (drift: last / first above DRIFT_P99_RATIO and more than DRIFT_P99_MS ms apart).

Written to --out (default artifacts/soak): soak.json, soak.md, soak.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from hdrh.histogram import HdrHistogram

from broker.kafka_cluster import LocalKafkaCluster
from broker.topics import TopicLayout
from signer.topology import Enclaves, Topology

from .harness import Stack, drive, progress
from .profile import digest_request

SAMPLE_S = 5.0
SHARE = 0.6  # of the closed-loop maximum
# hosts notice a dead enclave within 2 s; a dead host is out of the group within 6 s
HOST_SETTINGS = {"SIGNER_SESSION_TIMEOUT_MS": "6000", "SIGNER_HEARTBEAT_INTERVAL_MS": "300",
                 "SIGNER_DEAD_AFTER_MS": "2000"}  # fmt: skip
FAULTS = ("broker", "host", "enclave")
DOWN_S = {"broker": 10.0, "host": 5.0, "enclave": 3.0}  # how long the victim stays dead
HOSTS = ("h0", "h1")
ENCLAVES = ("e0", "e1")
WITNESSES = ("h0", "e0")  # never killed: their RSS is the drift measure

# drift thresholds (first fifth vs last fifth, means of the 5 s samples)
DRIFT_RSS_PCT = 10.0
DRIFT_RSS_MIB = 20.0
DRIFT_P99_RATIO = 1.5
DRIFT_P99_MS = 10.0
KEEP_UP = 0.9  # results/s in the last fifth below this share of the offered rate: the cluster fell behind


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def fault_times(duration: float, every: float) -> list[float]:
    """When faults start (seconds into the open loop): from the end of the first fifth, every `every`
    seconds (less on a short run, so that the three kinds fit), until 20 s before the last fifth."""
    if every <= 0:
        return []
    start, end = duration / 5, duration * 4 / 5 - 20
    if end < start:
        return []
    every = min(every, (end - start) / (len(FAULTS) - 1))
    if every <= 0:
        return [start]
    out, t = [], start
    while t <= end + 1e-6:
        out.append(round(t, 1))
        t += every
    return out


@dataclass
class Sample:
    t: float  # seconds since the open loop started
    results_per_s: float
    p99_ms: float | None
    sent: int
    answered: int
    rss_mib: dict[str, float | None]


@dataclass
class Fault:
    kind: str
    victim: str
    t_kill: float
    t_restart: float = 0.0
    t_back: float = 0.0  # the victim serves again (a broker: every replica in sync)
    detail: str = ""


@dataclass
class OpenLoop:
    """The open loop's bookkeeping: request n is "s{n}", intended at t0 + n / rate."""

    rate: float
    t0: float = 0.0
    sent: int = 0
    acked: bytearray = field(default_factory=bytearray)  # 1: the broker acknowledged it, 2: the send failed
    answers: bytearray = field(default_factory=bytearray)  # results seen per id (saturating at 255)
    statuses: dict[str, int] = field(default_factory=dict)
    window: list[float] = field(default_factory=list)  # latencies (ms) of first answers in this window
    hist: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000_000, 3))
    strays: int = 0  # results for ids this loop did not send (earlier phases' redeliveries)

    def intended(self, n: int) -> float:
        return self.t0 + n / self.rate

    def grow(self, n: int) -> None:
        while len(self.answers) <= n:
            self.answers.extend(bytes(4096))
            self.acked.extend(bytes(4096))


class Soak:
    def __init__(self, out: Path, minutes: float, fault_every: float) -> None:
        self.out, self.duration, self.fault_every = out, minutes * 60, fault_every
        self.work = Path(tempfile.mkdtemp(prefix="signer-soak-"))
        self.sock_dir = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))  # Unix socket paths are short
        self.kafka = LocalKafkaCluster(brokers=3, data_dir=self.work / "kafka")
        # replicas: min(3, brokers) from the formed cluster's metadata (a host process takes no replication_factor)
        self.layout = replace(TopicLayout(), request_partitions=8, result_partitions=4)
        self.replicas: dict[str, list[int]] = {}
        self.topology = Topology(self.work, sock_dir=self.sock_dir, log_dir=self.work / "logs", layout=self.layout,
                                 group_id="soak", host_settings=HOST_SETTINGS, log_level="WARNING")  # fmt: skip
        self.stack = Stack(self.topology)
        self.samples: list[Sample] = []
        self.faults: list[Fault] = []
        self.unexpected: list[str] = []
        self.hosts_at_end: dict[str, dict[str, Any]] = {}
        self.hosts_after_drain: dict[str, dict[str, Any]] = {}
        self._busy: set[str] = set()  # processes a fault is acting on

    # -- the cluster ------------------------------------------------------------------------------

    async def start(self) -> None:
        progress("starting three Kafka brokers")
        await asyncio.to_thread(self.kafka.start)
        topo = self.topology
        topo.bootstrap = self.kafka.bootstrap
        progress("dev KMS, enclaves, hosts")
        await topo.start_kms()
        await topo.provision()
        await topo.start_enclaves(Enclaves(len(ENCLAVES), "e"))
        for name in HOSTS:
            await topo.start_host(name)
        operator = topo.operator()
        for i in range(8):
            self.stack.keys.append(await operator.create_key("secp256k1", f"soak{i % 4}"))
        await asyncio.to_thread(self.kafka.wait_in_sync, self.topics(), 90)
        md = await asyncio.to_thread(self.kafka.metadata, self.topics())
        self.replicas = {t: sorted({len(p.replicas) for p in parts.values()}) for t, parts in md.topics.items()}
        if self.replicas.get(self.layout.requests) != [3]:
            raise RuntimeError(f"the topics were not created with three replicas: {self.replicas}")

    def topics(self) -> list[str]:
        return [t.name for t in self.layout.new_topics()]

    async def close(self) -> None:
        """Stop every process (by pid), keep the logs in OUT/logs, remove the work directories."""
        try:
            await self.topology.aclose()
        finally:
            await asyncio.to_thread(self.kafka.stop)
            with contextlib.suppress(OSError):
                shutil.copytree(self.work / "logs", self.out / "logs", dirs_exist_ok=True)
            shutil.rmtree(self.work, ignore_errors=True)
            shutil.rmtree(self.sock_dir, ignore_errors=True)

    def pids(self) -> dict[str, int | None]:
        topo = self.topology
        out: dict[str, int | None] = {}
        for name in HOSTS:
            host = topo.hosts.get(name)
            out[name] = host.process.pid if host is not None and host.process.running else None
        for name in ENCLAVES:
            enc = topo.enclaves.get(name)
            out[name] = enc.process.pid if enc is not None and enc.process.running else None
        for n in self.kafka.nodes:
            out[f"broker{n.node_id}"] = n.pid if n.running else None
        return out

    async def host_states(self) -> dict[str, dict[str, Any]]:
        """Each host's /readyz and a few gauges from /metrics, as the open loop ends."""
        import aiohttp

        out: dict[str, dict[str, Any]] = {}
        names = ("signer_in_flight", "signer_paused_partitions", "signer_consumer_lag",
                 "signer_channel_reconnects_total", "signer_redispatched_requests_total")  # fmt: skip
        for name, host in self.topology.hosts.items():
            state: dict[str, Any] = {}
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
                    async with s.get(f"{host.url}/readyz") as r:
                        state["readyz"] = await r.json(content_type=None)
                    async with s.get(f"{host.url}/metrics") as r:
                        text = await r.text()
            except Exception as exc:
                out[name] = {"error": repr(exc)}
                continue
            for line in text.splitlines():
                metric = line.split("{")[0].split(" ")[0]
                if metric in names and not line.startswith("#"):
                    state[metric] = state.get(metric, 0.0) + float(line.rsplit(" ", 1)[1])
            out[name] = state
        return out

    # -- the closed-loop maximum --------------------------------------------------------------------

    async def maximum(self, total: int) -> float:
        host = self.topology.hosts["h0"]
        await drive(self.stack, host, "warm-up", 3000, outstanding=4000, make=digest_request)
        closed = await drive(self.stack, host, "closed loop (max)", total, outstanding=4000, make=digest_request)
        return closed.per_second

    # -- the open loop --------------------------------------------------------------------------------

    async def open_loop(self, rate: float) -> OpenLoop:
        loop = OpenLoop(rate)
        bootstrap = self.kafka.bootstrap
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id="soak-load", acks="all",
                                    enable_idempotence=True, linger_ms=2, request_timeout_ms=60_000,
                                    retry_backoff_ms=200)  # fmt: skip
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, client_id="soak-results")
        await producer.start()
        await consumer.start()
        tps = [TopicPartition(self.layout.results, p) for p in range(self.layout.result_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        stop = asyncio.Event()
        loop.t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(self._receive(consumer, loop), name="receive"),
            asyncio.create_task(self._sample(loop, stop), name="sample"),
            asyncio.create_task(self._faults(loop, stop), name="faults"),
            asyncio.create_task(self._watch(stop), name="watch"),
        ]
        try:
            await self._send(producer, loop)
            stop.set()
            await producer.flush()
            self.hosts_at_end = await self.host_states()
            progress("draining: every request answered, every offset committed")
            await self._drain(loop, consumer)
            self.hosts_after_drain = await self.host_states()
            await asyncio.gather(*tasks[1:3])  # the last sample; a fault in progress ends
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await producer.stop()
            await consumer.stop()
        return loop

    async def _send(self, producer: AIOKafkaProducer, loop: OpenLoop) -> None:
        rnd = random.Random(11)
        keys = self.stack.keys
        partitions = self.layout.request_partitions
        total = int(loop.rate * self.duration)
        for n in range(total):
            delay = loop.intended(n) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key = keys[n % len(keys)]
            body = {"v": 1, "request_id": f"s{n}", "key_id": key["key_id"], "scheme": "secp256k1_digest",
                    "payload": rnd.randbytes(32)}  # fmt: skip
            loop.grow(n)
            fut = await producer.send(self.layout.requests, msgpack.packb(body), key=key["key_id"].encode(),
                                      partition=n % partitions)  # fmt: skip
            fut.add_done_callback(_acked(loop, n))
            loop.sent = n + 1

    async def _receive(self, consumer: AIOKafkaConsumer, loop: OpenLoop) -> None:
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=200)
            except Exception:  # a broker may be down or its partitions moving: keep reading
                await asyncio.sleep(0.2)
                continue
            now = time.perf_counter()
            for recs in batch.values():
                for rec in recs:
                    assert rec.value is not None
                    m = msgpack.unpackb(rec.value, raw=False)
                    rid = m.get("request_id") or ""
                    if not (rid.startswith("s") and rid[1:].isdigit()):
                        loop.strays += 1
                        continue
                    n = int(rid[1:])
                    if n >= len(loop.answers):
                        loop.strays += 1
                        continue
                    seen = loop.answers[n]
                    loop.answers[n] = min(255, seen + 1)
                    if seen == 0:
                        ms = max(0.001, (now - loop.intended(n)) * 1000)
                        loop.window.append(ms)
                        loop.hist.record_value(int(ms * 1000))
                        status = str(m.get("status"))
                        loop.statuses[status] = loop.statuses.get(status, 0) + 1

    async def _sample(self, loop: OpenLoop, stop: asyncio.Event) -> None:
        last_t, last_answered = loop.t0, 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, last_t + SAMPLE_S - time.perf_counter())):
                    await stop.wait()
            now = time.perf_counter()
            window, loop.window = loop.window, []
            answered = last_answered + len(window)
            p99 = None
            if window:
                window.sort()
                p99 = window[min(len(window) - 1, int(len(window) * 0.99))]
            rss = {name: rss_mib(pid) for name, pid in self.pids().items()}
            s = Sample(round(now - loop.t0, 2), len(window) / max(1e-6, now - last_t),
                       round(p99, 2) if p99 is not None else None, loop.sent, answered, rss)  # fmt: skip
            self.samples.append(s)
            last_t, last_answered = now, answered
            fault = f", fault: {self.faults[-1].kind}" if self.faults and not self.faults[-1].t_back else ""
            progress(f"{s.t:6.0f}s {s.results_per_s:6.0f}/s p99 {s.p99_ms} ms h0 {rss.get('h0') or 0:.0f} MiB{fault}")

    async def _faults(self, loop: OpenLoop, stop: asyncio.Event) -> None:
        kill = {"broker": self._kill_broker, "host": self._kill_host, "enclave": self._kill_enclave}
        for k, at in enumerate(fault_times(self.duration, self.fault_every)):
            delay = loop.t0 + at - time.perf_counter()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
            if stop.is_set():
                return
            kind = FAULTS[k % len(FAULTS)]
            fault = Fault(kind, "", self._since(loop))
            self.faults.append(fault)  # listed while in progress (the samples show it)
            try:
                await kill[kind](loop, fault)
            except Exception as exc:  # the run goes on; the report says what went wrong
                fault.detail += f" FAILED: {exc!r}"[:300]

    def _since(self, loop: OpenLoop) -> float:
        return round(time.perf_counter() - loop.t0, 2)

    async def _kill_broker(self, loop: OpenLoop, fault: Fault) -> None:
        md = await asyncio.to_thread(self.kafka.metadata, [self.layout.requests])
        led: dict[int, list[int]] = {}
        for p, s in md.topics[self.layout.requests].items():
            if s.leader >= 0:
                led.setdefault(self.kafka.index_of(s.leader), []).append(p)
        victim = max(led, key=lambda i: len(led[i]))
        fault.victim, fault.detail = f"broker{victim + 1}", f"led request partitions {sorted(led[victim])}"
        fault.t_kill = self._since(loop)
        await asyncio.to_thread(self.kafka.kill, victim)
        await asyncio.sleep(DOWN_S["broker"])
        fault.t_restart = self._since(loop)
        await asyncio.to_thread(self.kafka.start_node, victim)
        await asyncio.to_thread(self.kafka.wait_in_sync, self.topics(), 120)
        fault.t_back = self._since(loop)

    async def _kill_host(self, loop: OpenLoop, fault: Fault) -> None:
        name = fault.victim = HOSTS[-1]
        self._busy.add(name)
        try:
            await self.topology.hosts[name].process.astop(signal.SIGKILL)
            await asyncio.sleep(DOWN_S["host"])
            fault.t_restart = self._since(loop)
            await self.topology.start_host(name)
            fault.t_back = self._since(loop)
        finally:
            self._busy.discard(name)

    async def _kill_enclave(self, loop: OpenLoop, fault: Fault) -> None:
        name = fault.victim = ENCLAVES[-1]
        self._busy.add(name)
        try:
            await self.topology.enclaves[name].process.astop(signal.SIGKILL)
            await asyncio.sleep(DOWN_S["enclave"])
            fault.t_restart = self._since(loop)
            await self.topology.start_enclave(name)
            fault.t_back = self._since(loop)
        finally:
            self._busy.discard(name)

    async def _watch(self, stop: asyncio.Event) -> None:
        """A host or enclave that dies by itself is listed and started again (as systemd would)."""
        topo = self.topology
        while not stop.is_set():
            await asyncio.sleep(0.5)  # polls the processes' exit
            for name in (*HOSTS, *ENCLAVES):
                if name in self._busy:
                    continue
                proc = topo.process(name)
                if proc.running:
                    continue
                code = await proc.astop()
                self.unexpected.append(f"{name} exited {code}")
                if name in HOSTS:
                    await topo.start_host(name)
                else:
                    await topo.start_enclave(name)

    async def _drain(self, loop: OpenLoop, consumer: AIOKafkaConsumer, timeout: float = 180) -> None:
        """Until every acknowledged request is answered (or `timeout`), the group has committed every
        request partition, and the results topic is read to its end offsets (late duplicates included)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = sum(1 for n in range(loop.sent) if loop.acked[n] == 1 and loop.answers[n] == 0)
            unsure = sum(1 for n in range(loop.sent) if loop.acked[n] == 0)
            if not pending and not unsure:
                break
            await asyncio.sleep(0.5)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(10.0, deadline - time.monotonic())):
                while not await self._all_committed():  # noqa: ASYNC110 - polls the group's offsets in Kafka
                    await asyncio.sleep(0.5)
        tps = [TopicPartition(self.layout.results, p) for p in range(self.layout.result_partitions)]
        ends = await consumer.end_offsets(tps)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while any([await consumer.position(tp) < ends[tp] for tp in tps]):  # noqa: ASYNC110 - the receiver reads
                    await asyncio.sleep(0.2)

    async def _all_committed(self) -> bool:
        bootstrap = self.kafka.bootstrap
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="soak-offsets")
        try:
            await admin.start()
            committed = await admin.list_consumer_group_offsets("soak")
        except Exception:
            return False
        finally:
            await admin.close()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="soak-offsets")
        await consumer.start()
        try:
            parts = [TopicPartition(self.layout.requests, p) for p in range(self.layout.request_partitions)]
            ends = await consumer.end_offsets(parts)
        finally:
            await consumer.stop()
        return all(tp in committed and committed[tp].offset >= ends[tp] for tp in parts if ends[tp] > 0)


def _acked(loop: OpenLoop, n: int) -> Any:
    def done(fut: asyncio.Future[Any]) -> None:
        loop.acked[n] = 1 if not fut.cancelled() and fut.exception() is None else 2

    return done


# -- the report ----------------------------------------------------------------------------------------


def fifths(samples: list[Sample], duration: float) -> tuple[list[Sample], list[Sample]]:
    first = [s for s in samples if s.t <= duration / 5 + 0.5]
    last = [s for s in samples if duration * 4 / 5 - 0.5 <= s.t <= duration + 0.5]
    return first, last


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.fmean(got) if got else None


def drift(samples: list[Sample], duration: float, rate: float) -> list[dict[str, Any]]:
    """First fifth vs last fifth. The window p99 counts answered requests only: a cluster that falls
    behind (results/s in the last fifth below KEEP_UP of the offered rate) leaves requests with no
    latency at all, so its latency verdict is drift whatever the p99 says."""
    first, last = fifths(samples, duration)
    rows: list[dict[str, Any]] = []
    for name in WITNESSES:
        a, b = _mean([s.rss_mib.get(name) for s in first]), _mean([s.rss_mib.get(name) for s in last])
        row: dict[str, Any] = {"measure": f"{name} RSS, MiB", "first": a, "last": b}
        if a is not None and b is not None:
            growth, pct = b - a, (b - a) / a * 100
            row.update(change=f"{growth:+.1f} MiB ({pct:+.1f}%)",
                       threshold=f"> {DRIFT_RSS_PCT:.0f}% and > {DRIFT_RSS_MIB:.0f} MiB",
                       verdict="drift" if pct > DRIFT_RSS_PCT and growth > DRIFT_RSS_MIB else "no drift",
                       growth_mib=round(growth, 2), growth_pct=round(pct, 2))  # fmt: skip
        rows.append(row)
    for name in ("h1", "e1"):  # killed and started again during the run: for information
        a, b = _mean([s.rss_mib.get(name) for s in first]), _mean([s.rss_mib.get(name) for s in last])
        rows.append({"measure": f"{name} RSS, MiB (restarted by faults)", "first": a, "last": b,
                     "change": f"{(b - a):+.1f} MiB" if a is not None and b is not None else "",
                     "threshold": "-", "verdict": "(not judged)"})  # fmt: skip
    a, b = _mean([s.p99_ms for s in first]), _mean([s.p99_ms for s in last])
    row = {"measure": "p99 latency over 5 s windows, ms", "first": a, "last": b}
    if a is not None and b is not None and a > 0:
        ratio = b / a
        row.update(change=f"x{ratio:.2f}", threshold=f"> x{DRIFT_P99_RATIO} and > {DRIFT_P99_MS:.0f} ms apart",
                   verdict="drift" if ratio > DRIFT_P99_RATIO and b - a > DRIFT_P99_MS else "no drift",
                   ratio=round(ratio, 3))  # fmt: skip
    rows.append(row)
    a, b = _mean([s.results_per_s for s in first]), _mean([s.results_per_s for s in last])
    behind = b is not None and b < rate * KEEP_UP
    rows.append({"measure": "results per second", "first": a, "last": b, "change": f"x{b / a:.2f}" if a and b else "",
                 "threshold": f"< {KEEP_UP:.0%} of the offered {rate:.0f}/s", "fell_behind": behind,
                 "verdict": "falls behind" if behind else "keeps up"})  # fmt: skip
    for r in rows:
        for k in ("first", "last"):
            r[k] = round(r[k], 2) if r[k] is not None else None
    return rows


def accounting(loop: OpenLoop) -> dict[str, Any]:
    sent = loop.sent
    acked = sum(1 for n in range(sent) if loop.acked[n] == 1)
    failed = sum(1 for n in range(sent) if loop.acked[n] == 2)
    answered = sum(1 for n in range(sent) if loop.answers[n])
    lost = sum(1 for n in range(sent) if loop.acked[n] == 1 and not loop.answers[n])
    extra = array("I", (max(0, loop.answers[n] - 1) for n in range(sent)))
    return {
        "sent": sent, "acknowledged_by_kafka": acked, "send_failures": failed, "answered_ids": answered,
        "lost": lost, "duplicates": int(sum(extra)), "ids_with_duplicates": sum(1 for e in extra if e),
        "statuses": loop.statuses, "results_for_other_ids": loop.strays,
    }  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    acc = r["accounting"]
    lat = r["latency_ms"]
    lines = [
        "# Soak (`python -m bench soak`)",
        "",
        f"- cluster: 3 Kafka brokers (3 replicas, min.insync.replicas=2), dev KMS, 2 enclave workers, "
        f"2 `signer host` processes; {r['machine']['cpus']} CPUs shared",
        f"- closed-loop maximum: **{r['max_per_second']:,.0f}**/s; open loop at {int(SHARE * 100)}%: "
        f"**{r['rate']:,.0f}**/s for {r['minutes']} min ({r['seconds']:.0f} s measured)",
        f"- whole open loop, from intended send time: p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"p99.9 {lat['p99.9']} ms, max {lat['max']} ms",
        f"- requests: {acc['sent']:,} sent, {acc['acknowledged_by_kafka']:,} acknowledged by Kafka, "
        f"{acc['answered_ids']:,} answered; **lost {acc['lost']}**, **duplicates {acc['duplicates']}** "
        f"({acc['ids_with_duplicates']} ids), send failures {acc['send_failures']}, statuses {acc['statuses']}",
        f"- unexpected process exits: {', '.join(r['unexpected_exits']) or 'none'}",
        "",
        "## Hosts when the load stopped, and after the drain",
        "",
        "| host | when | ready | in flight | paused partitions | consumer lag | channel reconnects | redispatched |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for when, key in (("load stopped", "hosts_at_end"), ("after drain", "hosts_after_drain")):
        for name, h in r.get(key, {}).items():
            ready = h.get("readyz", {})
            lines.append(
                f"| {name} | {when} | {ready.get('ready', h.get('error', '?'))} {ready.get('checks', '')} | "
                f"{h.get('signer_in_flight', '')} | {h.get('signer_paused_partitions', '')} | "
                f"{h.get('signer_consumer_lag', '')} | {h.get('signer_channel_reconnects_total', '')} | "
                f"{h.get('signer_redispatched_requests_total', '')} |"
            )
    lines += [
        "",
        "## Faults",
        "",
        "| t, s | fault | victim | started again at, s | serving again at, s | |",
        "|---|---|---|---|---|---|",
    ]
    for f in r["faults"]:
        lines.append(f"| {f['t_kill']} | SIGKILL {f['kind']} | {f['victim']} | {f['t_restart']} | {f['t_back']} | "
                     f"{f['detail']} |")  # fmt: skip
    if not r["faults"]:
        lines.append("| - | none | | | | |")
    lines += [
        "",
        "## Drift: mean of the first fifth vs the last fifth of the run (5 s samples)",
        "",
        "Faults fall in the middle three fifths only. h0 and e0 are never killed: their RSS is the "
        "memory measure (h1 and e1 are restarted by the faults; shown for information). The window p99 "
        "counts answered requests only: if the last fifth falls behind the offered rate, latency is drift.",
        "",
        "| measure | first fifth | last fifth | change | drift if | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for d in r["drift"]:
        lines.append(f"| {d['measure']} | {d['first']} | {d['last']} | {d.get('change', '')} | "
                     f"{d.get('threshold', '')} | {d.get('verdict', 'n/a')} |")  # fmt: skip
    lines += ["", f"**Memory: {r['verdict']['memory']}; latency: {r['verdict']['latency']}.**", "",
              "Plot: soak.png (throughput, p99, RSS over time; faults marked)."]  # fmt: skip
    if r["minutes"] < 10:
        lines += ["", f"A {r['minutes']}-minute run shows start-up settling more than slow leaks: a leak of a few "
                  "MiB per hour needs an hour or more to cross the thresholds."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(out: Path, r: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = r["samples"]
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    ax.plot(t, [s["results_per_s"] for s in samples], label="results/s")
    ax.axhline(r["rate"], color="grey", linestyle=":", label=f"offered {r['rate']:.0f}/s")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("results per second")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    ax.plot(t, [s["p99_ms"] if s["p99_ms"] is not None else float("nan") for s in samples], color="tab:red")
    ax.set_yscale("log")
    ax.set_ylabel("p99 over 5 s, ms (log)")
    ax = axes[2]
    names = [n for n in (*HOSTS, *ENCLAVES) if any(s["rss_mib"].get(n) for s in samples)]
    for name in names:
        ax.plot(t, [s["rss_mib"].get(name) or float("nan") for s in samples], label=name)
    ax.set_ylabel("RSS, MiB")
    ax.set_xlabel("seconds into the open loop")
    ax.legend(fontsize=7, loc="upper left", ncol=4)
    colors = {"broker": "tab:purple", "host": "tab:orange", "enclave": "tab:green"}
    duration = r["seconds"]
    for ax in axes:
        ax.axvspan(0, duration / 5, color="grey", alpha=0.08)
        ax.axvspan(duration * 4 / 5, duration, color="grey", alpha=0.08)
        for f in r["faults"]:
            ax.axvspan(f["t_kill"], f["t_back"] or f["t_kill"], color=colors[f["kind"]], alpha=0.15)
            ax.axvline(f["t_kill"], color=colors[f["kind"]], linewidth=1)
    for f in r["faults"]:
        axes[0].annotate(f"{f['kind']} {f['victim']}", (f["t_kill"], 0.02), xycoords=("data", "axes fraction"),
                         fontsize=7, rotation=90, color=colors[f["kind"]])  # fmt: skip
    axes[0].set_title("soak: shaded = fault until serving again; grey = first and last fifth", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=90)
    plt.close(fig)


async def run_soak(out: Path, minutes: float, fault_every: float = 180.0, closed_total: int = 30_000) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    soak = Soak(out, minutes, fault_every)
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "minutes": minutes, "fault_every_s": fault_every}
    try:
        await soak.start()
        progress("closed-loop maximum")
        maximum = await soak.maximum(closed_total)
        rate = max(10.0, maximum * SHARE)
        report.update(max_per_second=round(maximum, 1), rate=round(rate, 1))
        loop = await soak.open_loop(rate)
    finally:
        await soak.close()
    print(file=sys.stderr)
    report["seconds"] = soak.duration
    report["replicas"] = soak.replicas
    report["latency_ms"] = {
        **{f"p{p}": round(loop.hist.get_value_at_percentile(p) / 1000, 1) for p in (50, 90, 99, 99.9)},
        "max": round(loop.hist.get_max_value() / 1000, 1),
    }
    report["accounting"] = accounting(loop)
    report["faults"] = [f.__dict__ for f in soak.faults]
    report["unexpected_exits"] = soak.unexpected
    report["hosts_at_end"] = soak.hosts_at_end
    report["hosts_after_drain"] = soak.hosts_after_drain
    report["samples"] = [s.__dict__ for s in soak.samples]
    report["drift"] = drift(soak.samples, soak.duration, report["rate"])
    verdicts = {d["measure"]: d.get("verdict") for d in report["drift"]}
    memory = [verdicts[f"{n} RSS, MiB"] for n in WITNESSES]
    behind = report["drift"][-1]["fell_behind"]
    report["verdict"] = {
        "memory": "drift" if "drift" in memory else ("no drift" if all(memory) else "n/a"),
        "latency": "drift (fell behind the offered rate)"
        if behind
        else verdicts["p99 latency over 5 s windows, ms"] or "n/a",
    }
    report["thresholds"] = {"rss_pct": DRIFT_RSS_PCT, "rss_mib": DRIFT_RSS_MIB, "p99_ratio": DRIFT_P99_RATIO,
                            "p99_ms": DRIFT_P99_MS}  # fmt: skip
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    (out / "soak.md").write_text(markdown(report))
    plot(out, report)
    return report
