"""The benchmark harness: `python -m bench report` (see bench/README.md).

One run measures, on the same machine and in the same minutes (ratios, not absolute
numbers, are what survive a shared, noisy machine):
- the raw ceiling: coincurve signatures per second on one core;
- the reference design (a connection, an RSA key pair, an attestation and a KMS
  Decrypt per request) through the same dev KMS;
- the pipeline at its maximum (closed loop, N outstanding) and at 50% / 80% of
  it (open loop, coordinated-omission-safe: latency counts from the intended send
  time), with HDR latency percentiles, the per-stage breakdown from the host's
  /metrics, CPU per request of the host and enclave processes, RSS, KMS calls;
- sweeps (enclave count, batch window, in-flight bound, link latency) showing
  where the bottleneck moves.
Real parts: Kafka, the dev KMS, enclave worker processes and a `signer host` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hdrh.histogram import HdrHistogram

from broker.topics import TopicLayout
from devkms.local import DEV_REGION, DevEnclave, dev_credentials
from enclave_worker.attestation import DevProvider
from enclave_worker.kms import KmsClient, KmsConfig
from schemas.records import KeyringEnvelope, SealedKey
from signer.operator import AdminSession
from signer.topology import Enclave, Enclaves, HostProcess, Topology

from .ceiling import raw_sign_rate
from .reference import reference_rate

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("kafka_wait", "host_queue", "credit_wait", "channel_transfer", "enclave_service", "result_publish")
CLK = os.sysconf("SC_CLK_TCK")


@dataclass
class Profile:
    closed_total: int = 20_000
    outstanding: int = 4_000
    open_seconds: float = 10.0
    reference_requests: int = 20
    sweep_total: int = 3_000
    sweeps: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"name": "1 enclave", "enclaves": 1},
            {"name": "2 enclaves", "enclaves": 2},
            {"name": "batch window 0", "env": {"SIGNER_BATCH_WINDOW_US": "0"}},
            {"name": "batch window 2 ms", "env": {"SIGNER_BATCH_WINDOW_US": "2000"}},
            {"name": "in flight 200", "env": {"SIGNER_MAX_IN_FLIGHT": "200", "SIGNER_MAX_BATCH": "100"}},
            {"name": "in flight 10000", "env": {"SIGNER_MAX_IN_FLIGHT": "10000"}},
            {"name": "link +2 ms", "link": "?latency_ms=2"},
            {"name": "link 20 Mbit/s", "link": "?bandwidth_mbps=20"},
        ]
    )


SMOKE = Profile(
    closed_total=600,
    outstanding=200,
    open_seconds=2.0,
    reference_requests=2,
    sweep_total=300,
    sweeps=[{"name": "1 enclave", "enclaves": 1}, {"name": "link +2 ms", "link": "?latency_ms=2"}],
)


def progress(msg: str) -> None:
    print(f"\r[bench] {msg:<78}", end="", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_kb(pid: int) -> int:
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else 0


@dataclass
class Stack:
    """Kafka, the dev KMS (its dev enclave configuration, operator key and keyring KMS key) and the
    enclave workers every host of a run shares."""

    topology: Topology
    keys: list[dict[str, Any]] = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.topology.data_dir

    @property
    def bootstrap(self) -> str:
        return self.topology.bootstrap

    @property
    def kms_url(self) -> str:
        return self.topology.kms_url

    @property
    def dev(self) -> DevEnclave:
        assert self.topology.dev is not None
        return self.topology.dev

    @property
    def enclaves(self) -> list[Enclave]:
        return list(self.topology.enclaves.values())

    async def close(self) -> None:
        await self.topology.aclose()


async def start_stack(work: Path, enclaves: int = 2) -> Stack:
    topology = Topology(work, sock_dir=work, log_level="WARNING")
    stack = Stack(topology)
    try:
        progress("starting Kafka")
        await topology.start_kafka()
        await topology.start_kms()
        await topology.provision()
        await topology.start_enclaves(Enclaves(count=enclaves, prefix="enc"))
    except BaseException:
        await stack.close()
        raise
    return stack


async def start_host(stack: Stack, enclaves: int, link: str = "", env: dict[str, str] | None = None) -> HostProcess:
    """A `signer host` process on topics of its own, over the first `enclaves` workers behind `link`."""
    tag = uuid.uuid4().hex[:6]
    layout = replace(
        TopicLayout(),
        requests=f"b{tag}.requests",
        results=f"b{tag}.results",
        dlq=f"b{tag}.dlq",
        admin=f"b{tag}.admin",
        admin_replies=f"b{tag}.admin.replies",
        request_partitions=8,
        result_partitions=4,
    )
    urls = [e.listen + link for e in stack.enclaves[:enclaves]]
    return await stack.topology.start_host(
        f"bench-{tag}", settings=env, layout=layout, group_id=f"bench-{tag}", enclaves=urls, timeout=90
    )


def admin(stack: Stack, host: HostProcess) -> AdminSession:
    """The dev operator over this host's admin topics: signs each operation, verifies each receipt."""
    return stack.topology.operator(host.config.layout)


async def metrics_text(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


def stage_sums(text: str) -> dict[str, tuple[float, float]]:
    out = {}
    for stage in STAGES:
        s = re.search(rf'^signer_stage_seconds_sum{{stage="{stage}"}} (\S+)$', text, re.M)
        c = re.search(rf'^signer_stage_seconds_count{{stage="{stage}"}} (\S+)$', text, re.M)
        out[stage] = (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)
    return out


async def kms_calls(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/_dev/stats") as r:
        return int(sum((await r.json())["calls"].values()))


def make_request(i: int, keys: list[dict[str, Any]], rnd: random.Random) -> tuple[bytes, bytes]:
    """A mix of schemes and keys: digests, EIP-1559 transactions, ed25519 messages."""
    roll = rnd.random()
    req: dict[str, Any]
    if roll < 0.1:
        key = next(k for k in keys if k["scheme"] == "ed25519")
        req = {"scheme": "ed25519", "payload": b"bench message %d" % i}
    else:
        eth = [k for k in keys if k["scheme"] == "secp256k1"]
        key = eth[i % len(eth)]
        if roll < 0.3:
            req = {
                "scheme": "eth_tx",
                "payload": {
                    "type": 2,
                    "chainId": 1,
                    "nonce": i,
                    "to": b"\x11" * 20,
                    "value": 10**15,
                    "gas": 21000,
                    "maxFeePerGas": 3 * 10**10,
                    "maxPriorityFeePerGas": 10**9,
                },
            }
        else:
            req = {"scheme": "secp256k1_digest", "payload": rnd.randbytes(32)}
    body = {"v": 1, "request_id": f"r{i}", "key_id": key["key_id"], **req}
    return key["key_id"].encode(), msgpack.packb(body)


@dataclass
class RunResult:
    name: str
    requests: int = 0
    seconds: float = 0.0
    latency_us: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 120_000_000, 3))
    timeline: list[float] = field(default_factory=list)  # seconds since start at which each result arrived
    stages: dict[str, float] = field(default_factory=dict)  # mean seconds per request per stage
    host_cpu_us: float = 0.0
    enclave_cpu_us: float = 0.0
    broker_cpu_us: float = 0.0
    loadgen_cpu_us: float = 0.0  # this process: the load's producer and the results' consumer
    host_rss_kb: int = 0
    kms_per_1000: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentiles(self) -> dict[str, float]:
        return {f"p{p}": round(self.latency_us.get_value_at_percentile(p) / 1000, 2) for p in (50, 90, 99, 99.9)}

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.per_second),
            "latency_ms": self.percentiles(),
            "stage_ms_per_request": {k: round(v * 1000, 3) for k, v in self.stages.items()},
            "host_cpu_us_per_request": round(self.host_cpu_us, 1),
            "enclave_cpu_us_per_request": round(self.enclave_cpu_us, 1),
            "broker_cpu_us_per_request": round(self.broker_cpu_us, 1),
            "loadgen_cpu_us_per_request": round(self.loadgen_cpu_us, 1),
            "host_rss_mb": round(self.host_rss_kb / 1024, 1),
            "kms_calls_per_1000": round(self.kms_per_1000, 3),
            "statuses": self.statuses,
        }


MakeRequest = Callable[[int, list[dict[str, Any]], random.Random], tuple[bytes, bytes]]


async def _results_consumer(stack: Stack, host: HostProcess) -> AIOKafkaConsumer:
    """A consumer of the host's results partitions, positioned at their ends."""
    layout = host.config.layout
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, enable_auto_commit=False)
    await consumer.start()
    tps = [TopicPartition(layout.results, p) for p in range(layout.result_partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)
    return consumer


class _Meter:
    """CPU of the host, the enclaves, the broker and this process, the host's stage sums and the KMS
    calls, from start() to finish(): a run's per-request figures."""

    def __init__(self, stack: Stack, host: HostProcess) -> None:
        self.stack, self.host = stack, host
        self.enclave_pids = [e.process.pid for e in stack.enclaves if e.process.running]
        kafka = stack.topology.kafka
        self.broker_pid = kafka.pid if kafka is not None else None

    def _cpu(self) -> tuple[float, float, float, float]:
        """(host, enclaves, broker, this process) CPU seconds."""
        return (cpu_seconds(self.host.process.pid), sum(cpu_seconds(p) for p in self.enclave_pids),
                cpu_seconds(self.broker_pid) if self.broker_pid else 0.0, time.process_time())  # fmt: skip

    async def start(self) -> None:
        self.cpu0 = self._cpu()
        self.m0 = stage_sums(await metrics_text(self.host.port))
        self.k0 = await kms_calls(self.stack.kms_url)

    async def finish(self, res: RunResult, other_loadgen_cpu: float = 0.0) -> None:
        """Fill in `res`'s per-request figures (res.requests set); `other_loadgen_cpu`: CPU seconds of a
        load-generating process besides this one."""
        cpu1 = self._cpu()
        host, enclaves, broker, own = (b - a for a, b in zip(self.cpu0, cpu1, strict=True))
        res.host_cpu_us = host / res.requests * 1e6
        res.enclave_cpu_us = enclaves / res.requests * 1e6
        res.broker_cpu_us = broker / res.requests * 1e6
        res.loadgen_cpu_us = (own + other_loadgen_cpu) / res.requests * 1e6
        res.host_rss_kb = rss_kb(self.host.process.pid)
        m0, m1 = self.m0, stage_sums(await metrics_text(self.host.port))
        res.stages = {s: (m1[s][0] - m0[s][0]) / max(1.0, m1[s][1] - m0[s][1]) for s in STAGES}
        res.kms_per_1000 = (await kms_calls(self.stack.kms_url) - self.k0) * 1000 / res.requests


async def drive(
    stack: Stack, host: HostProcess, name: str, total: int, *, outstanding: int | None = None,
    rate: float | None = None, make: MakeRequest = make_request, linger_ms: int = 2, separate: bool = False,
) -> RunResult:  # fmt: skip
    """Closed loop (`outstanding` in flight) or open loop (`rate` per second): every request id is matched.
    With `separate` (open loop only), requests are produced by a process of their own (bench/loadgen.py)
    and this one only receives; the load generator's CPU is both processes'."""
    if separate and rate is not None:
        return await _drive_separate(stack, host, name, total, rate, make, linger_ms)
    res = RunResult(name)
    rnd = random.Random(7)
    layout = host.config.layout
    consumer = await _results_consumer(stack, host)
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=linger_ms)
    await producer.start()
    sent_at: dict[str, float] = {}
    window = asyncio.Semaphore(outstanding or total)
    done = asyncio.Event()
    meter = _Meter(stack, host)
    await meter.start()
    t0 = time.perf_counter()

    async def receive() -> None:
        while len(res.timeline) < total:
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                now = time.perf_counter()
                for rec in recs:
                    m = msgpack.unpackb(rec.value, raw=False)
                    start = sent_at.pop(m.get("request_id"), None)
                    if start is None:
                        continue
                    res.latency_us.record_value(max(1, int((now - start) * 1e6)))
                    res.timeline.append(now - t0)
                    res.statuses[m.get("status")] = res.statuses.get(m.get("status"), 0) + 1
                    window.release()
            if res.timeline and len(res.timeline) % 500 < 50:
                progress(f"{name}: {len(res.timeline)}/{total}")
        done.set()

    receiver = asyncio.create_task(receive())
    try:
        for i in range(total):
            key, value = make(i, stack.keys, rnd)
            if rate is not None:  # open loop: latency counts from the intended send time
                intended = t0 + i / rate
                delay = intended - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent_at[f"r{i}"] = intended
            else:
                await window.acquire()
                sent_at[f"r{i}"] = time.perf_counter()
            await producer.send(layout.requests, value, key=key)
        await producer.flush()
        async with asyncio.timeout(300):
            await done.wait()
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        await producer.stop()
        await consumer.stop()
    res.seconds = time.perf_counter() - t0
    res.requests = len(res.timeline)
    await meter.finish(res)
    return res


async def _drive_separate(
    stack: Stack, host: HostProcess, name: str, total: int, rate: float, make: MakeRequest, linger_ms: int
) -> RunResult:
    res = RunResult(name)
    layout = host.config.layout
    consumer = await _results_consumer(stack, host)
    meter = _Meter(stack, host)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", "--bootstrap", stack.bootstrap, "--topic", layout.requests,
        "--rate", str(rate), "-n", str(total), "--make", f"{make.__module__}:{make.__name__}",
        "--linger-ms", str(linger_ms), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(stack.keys).encode() + b"\n")
        await proc.stdin.drain()
        async with asyncio.timeout(60):
            line = await proc.stdout.readline()
        if line.strip() != b"READY":
            raise RuntimeError(f"bench.loadgen did not start: {line!r}")
        await meter.start()
        t0 = time.time() + 0.05
        proc.stdin.write(f"{t0!r}\n".encode())
        await proc.stdin.drain()
        seen: set[int] = set()
        async with asyncio.timeout(300):
            while len(seen) < total:
                for recs in (await consumer.getmany(timeout_ms=200)).values():
                    now = time.time()
                    for rec in recs:
                        m = msgpack.unpackb(rec.value, raw=False)
                        rid = m.get("request_id")
                        if not (isinstance(rid, str) and rid.startswith("r") and rid[1:].isdigit()):
                            continue
                        i = int(rid[1:])
                        if i >= total or i in seen:
                            continue
                        seen.add(i)
                        intended = t0 + i / rate  # latency from the intended send time
                        res.latency_us.record_value(max(1, int((now - intended) * 1e6)))
                        res.timeline.append(now - t0)
                        res.statuses[m.get("status")] = res.statuses.get(m.get("status"), 0) + 1
            line = await proc.stdout.readline()
        res.seconds = time.time() - t0
        child_cpu = float(line.split()[1]) if line.startswith(b"DONE") else 0.0
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await consumer.stop()
    res.requests = len(res.timeline)
    await meter.finish(res, other_loadgen_cpu=child_cpu)
    return res


async def run_report(out: Path, profile: Profile) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    work = Path(tempfile.mkdtemp(prefix="signer-bench-"))
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "profile": profile.__dict__}
    progress("raw coincurve ceiling")
    raw = raw_sign_rate(1.0)
    report["raw_sign_per_second_one_core"] = round(raw)
    stack = await start_stack(work, enclaves=2)
    try:
        host = await start_host(stack, enclaves=2)
        operator = admin(stack, host)
        for i in range(8):
            stack.keys.append(await operator.create_key("secp256k1", f"bench{i % 4}"))
        stack.keys.append(await operator.create_key("ed25519", "default"))
        progress("warm-up")
        await drive(stack, host, "warm-up", min(2000, profile.closed_total), outstanding=profile.outstanding)
        closed = await drive(stack, host, "closed loop (max)", profile.closed_total, outstanding=profile.outstanding)
        runs = [closed]
        for share in (0.5, 0.8):
            rate = max(10.0, closed.per_second * share)
            total = max(50, int(rate * profile.open_seconds))
            runs.append(await drive(stack, host, f"open loop {int(share * 100)}% ({rate:.0f}/s)", total, rate=rate))
        await host.process.astop()
        progress("reference design")
        report["reference"] = await _reference(stack, profile.reference_requests)
        sweeps = []
        for sw in profile.sweeps:
            h = await start_host(stack, enclaves=sw.get("enclaves", 2), link=sw.get("link", ""), env=sw.get("env"))
            r = await drive(stack, h, sw["name"], profile.sweep_total, outstanding=min(profile.outstanding, 2000))
            await h.process.astop()
            top = max(r.stages, key=lambda s: r.stages[s])
            sweeps.append({**r.summary(), "largest_stage": top})
    finally:
        await stack.close()
    progress("writing the report")
    enclave_cores = min(2, os.cpu_count() or 1)
    report["runs"] = [r.summary() for r in runs]
    report["sweeps"] = sweeps
    report["max_per_second"] = round(closed.per_second)
    report["efficiency"] = round(closed.per_second / (raw * enclave_cores), 3)
    report["speedup_over_reference"] = round(closed.per_second / report["reference"]["per_second"], 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plots(out, runs)
    print(file=sys.stderr)
    return report


async def _reference(stack: Stack, n: int) -> dict[str, Any]:
    import msgpack as _m

    kr = next(iter(sorted((stack.work / "keystore").iterdir())))
    env = KeyringEnvelope.from_wire(_m.unpackb(next(kr.glob("envelope.v*.msgpack")).read_bytes()))
    sealed = SealedKey.from_wire(_m.unpackb(next((kr / "keys").glob("*.msgpack")).read_bytes()))
    creds = dev_credentials()
    kms = KmsClient(KmsConfig(stack.kms_url, region=DEV_REGION, access_key_id=creds["SIGNER_KMS_ACCESS_KEY_ID"],
                              secret_access_key=creds["SIGNER_KMS_SECRET_ACCESS_KEY"]))  # fmt: skip
    # attests as the enclave does (same code, same configuration: the PCR0 the key policy names)
    provider = DevProvider(stack.work / "devkms" / "pki", stack.dev.config_path.read_bytes())
    try:
        return await reference_rate(stack.enclaves[0].listen, kms, provider, env, sealed, n)
    finally:
        await kms.close()


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Benchmark report",
        "",
        f"- raw coincurve ceiling (one core): **{r['raw_sign_per_second_one_core']:,}** signatures/s",
        f"- pipeline maximum (closed loop, through Kafka): **{r['max_per_second']:,}** signatures/s",
        f"- pipeline efficiency = max / (raw x {min(2, r['machine']['cpus'] or 1)} enclave cores): "
        f"**{r['efficiency']}**",
        f"- reference design (connection + RSA keygen + attestation + KMS Decrypt per request): "
        f"**{r['reference']['per_second']}** signatures/s; speed-up **{r['speedup_over_reference']}x**",
        "",
        "## Runs",
        "",
        "| run | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | host CPU us/req | enclave CPU us/req "
        "| host RSS MB | KMS/1000 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        p = run["latency_ms"]
        lines.append(
            f"| {run['name']} | {run['per_second']:,} | {p['p50']} | {p['p90']} | {p['p99']} | {p['p99.9']} | "
            f"{run['host_cpu_us_per_request']} | {run['enclave_cpu_us_per_request']} | {run['host_rss_mb']} | "
            f"{run['kms_calls_per_1000']} |"
        )
    lines += ["", "## Mean time per request by stage (ms), closed loop", "", "| stage | ms |", "|---|---|"]
    for stage, ms in r["runs"][0]["stage_ms_per_request"].items():
        lines.append(f"| {stage} | {ms} |")
    lines += [
        "",
        "## Sweeps: where the bottleneck moves",
        "",
        "| sweep | req/s | p99 ms | largest stage | " + " | ".join(STAGES) + " |",
        "|---|---|---|---|" + "---|" * len(STAGES),
    ]
    for s in r["sweeps"]:
        lines.append(
            f"| {s['name']} | {s['per_second']:,} | {s['latency_ms']['p99']} | {s['largest_stage']} | "
            + " | ".join(str(s["stage_ms_per_request"][k]) for k in STAGES)
            + " |"
        )
    lines += ["", "Plots: throughput.png (results per second over time), latency_cdf.png, stages.png.", ""]
    return "\n".join(lines)


def plots(out: Path, runs: list[RunResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in runs:
        if r.timeline:
            end = int(max(r.timeline)) + 1
            counts = [0] * (end * 4)
            for t in r.timeline:
                counts[int(t * 4)] += 1
            ax.plot([i / 4 for i in range(len(counts))], [c * 4 for c in counts], label=r.name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("results per second")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in runs:
        pts = [
            (p, r.latency_us.get_value_at_percentile(p) / 1000)
            for p in [i / 10 for i in range(0, 1000)] + [99.9, 99.99]
        ]
        ax.plot([v for _, v in pts], [p / 100 for p, _ in pts], label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("fraction of requests")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r.name for r in runs]
    bottom = [0.0] * len(runs)
    for stage in STAGES:
        vals = [r.stages.get(stage, 0) * 1000 for r in runs]
        ax.bar(names, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("ms per request")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=90)
    plt.close(fig)
