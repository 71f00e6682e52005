"""python -m bench gateway: what the HTTP gateway adds to the Kafka round trip, and how it holds under
many callers (see bench/README.md and docs/bench/gateway.md).

One run, one cluster: Kafka (the given one, or a local one started here), the dev KMS, one enclave
worker, a `signer host` process and a `python -m signer gateway` process.

1. Overhead at a low rate: `rate` requests per second for `seconds`, open loop, alternating between a
   call through the gateway (POST /v1/sign, JSON; from sending the call to its answer) and the same
   kind of request produced straight to Kafka (from producing it to its result read from the result
   topic, with the gateway's producer settings). p50/p99 of each and their difference.
2. Load: `callers` concurrent HTTP callers in a closed loop for `load_seconds`: every call answered
   exactly once (by its own request_id), statuses, calls per second, p50/p99, the gateway's RSS
   sampled every second.

Every signature is checked against the key's public key. Writes gateway.json and gateway.md to `out`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import coincurve
import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition

from broker.clients import result_producer
from broker.topics import TopicLayout
from signer.topology import Topology

from .harness import cpu_seconds, progress, rss_kb


@dataclass
class GatewayProfile:
    rate: float = 50.0  # requests per second on each path, alternating
    seconds: float = 30.0
    callers: int = 500
    load_seconds: float = 30.0
    warmup: int = 50


SMOKE = GatewayProfile(rate=20.0, seconds=2.0, callers=20, load_seconds=2.0, warmup=5)


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p99": 0.0}
    s = sorted(samples)
    return {
        "p50": round(s[len(s) // 2] * 1000, 2),
        "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 2),
    }


class _Signatures:
    """Checks that a 65-byte r||s||v signature over a digest is by the key."""

    def __init__(self, public_key_hex: str) -> None:
        self.public_key = bytes.fromhex(public_key_hex)
        self.bad = 0

    def check(self, digest: bytes, signature: bytes) -> None:
        recovered = coincurve.PublicKey.from_signature_and_message(signature, digest, hasher=None)
        if recovered.format(False) != self.public_key:
            self.bad += 1


class _KafkaPath:
    """The same request as the gateway sends, produced straight to Kafka; its result read from the result
    topic (every partition, from the end, read_committed), matched by request_id."""

    def __init__(self, bootstrap: str, layout: TopicLayout) -> None:
        self.layout = layout
        self.producer = result_producer(bootstrap, client_id="bench-gateway-direct", linger_ms=0)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                         isolation_level="read_committed", fetch_max_wait_ms=100)  # fmt: skip
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        parts = [TopicPartition(self.layout.results, p) for p in range(self.layout.result_partitions)]
        self.consumer.assign(parts)
        await self.consumer.seek_to_end(*parts)
        for tp in parts:
            await self.consumer.position(tp)
        self._reader = asyncio.create_task(self._read(), name="bench-direct-results")

    async def _read(self) -> None:
        while True:
            for records in (await self.consumer.getmany(timeout_ms=500)).values():
                for rec in records:
                    result = msgpack.unpackb(rec.value, raw=False)
                    future = self.waiting.pop(result.get("request_id"), None)
                    if future is not None and not future.done():
                        future.set_result(result)

    async def sign(self, request: dict[str, Any]) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self.waiting[request["request_id"]] = future
        raw = msgpack.packb(request, use_bin_type=True)
        await self.producer.send_and_wait(self.layout.requests, raw, key=request["key_id"].encode())
        async with asyncio.timeout(30):
            return await future

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.producer.stop()
        await self.consumer.stop()


async def _overhead(
    http: aiohttp.ClientSession, url: str, direct: _KafkaPath, key: dict[str, Any], sigs: _Signatures,
    gateway_pid: int, profile: GatewayProfile,
) -> dict[str, Any]:  # fmt: skip
    """Open loop: call i goes out at i / (2 * rate) s, even i through the gateway, odd i straight to Kafka."""
    latencies: dict[str, list[float]] = {"gateway": [], "kafka": []}
    failures: dict[str, int] = {"gateway": 0, "kafka": 0}

    async def one(path: str, i: int, measured: bool) -> None:
        digest = hashlib.sha256(f"{path}-{i}-{uuid.uuid4()}".encode()).digest()
        rid = f"ovh-{path}-{i}-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        if path == "gateway":
            body = {"request_id": rid, "key_id": key["key_id"], "scheme": "secp256k1_digest",
                    "payload": "0x" + digest.hex()}  # fmt: skip
            async with http.post(f"{url}/v1/sign", json=body) as r:
                result = await r.json()
            signature = bytes.fromhex(result["signature"][2:]) if result.get("status") == "ok" else b""
        else:
            result = await direct.sign({"v": 1, "request_id": rid, "key_id": key["key_id"],
                                        "scheme": "secp256k1_digest", "payload": digest})  # fmt: skip
            signature = result.get("signature", b"")
        elapsed = time.perf_counter() - t0
        if result.get("status") != "ok" or result.get("request_id") != rid:
            failures[path] += 1
            return
        sigs.check(digest, signature)
        if measured:
            latencies[path].append(elapsed)

    for i in range(profile.warmup):  # keyring unwrapped, connections open, JIT-free paths warm
        await one("gateway", i, False)
        await one("kafka", i, False)
    total = int(profile.rate * profile.seconds) * 2
    tasks: list[asyncio.Task[None]] = []
    cpu0, own0 = cpu_seconds(gateway_pid), time.process_time()
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / (2 * profile.rate) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one("gateway" if i % 2 == 0 else "kafka", i, True)))
        if i % 200 == 0:
            progress(f"overhead: {i}/{total}")
    await asyncio.gather(*tasks)
    gateway_cpu, own_cpu = cpu_seconds(gateway_pid) - cpu0, time.process_time() - own0
    gw, kafka = _percentiles(latencies["gateway"]), _percentiles(latencies["kafka"])
    return {
        "rate_per_second_each": profile.rate,
        "seconds": profile.seconds,
        "gateway": {"calls": len(latencies["gateway"]), "latency_ms": gw, "failures": failures["gateway"]},
        "kafka": {"requests": len(latencies["kafka"]), "latency_ms": kafka, "failures": failures["kafka"]},
        "added_ms": {p: round(gw[p] - kafka[p], 2) for p in ("p50", "p99")},
        # the gateway process's CPU per call (its idle polling included), and this process's per request
        # on both paths (the HTTP client, the direct producer and consumer, checking signatures)
        "gateway_cpu_us_per_call": round(gateway_cpu / max(1, len(latencies["gateway"])) * 1e6),
        "bench_cpu_us_per_request": round(own_cpu / max(1, total) * 1e6),
    }


async def _load(
    url: str, headers: dict[str, str], key: dict[str, Any], sigs: _Signatures, gateway_pid: int,
    profile: GatewayProfile,
) -> dict[str, Any]:  # fmt: skip
    """Closed loop: `callers` callers, each sending its next call when the previous one is answered."""
    sent: list[str] = []
    answered: dict[str, int] = {}
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    rss_mib = [rss_kb(gateway_pid) / 1024]
    stop_at = time.monotonic() + profile.load_seconds

    async def caller(http: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            rid = f"load-{n}-{i}"
            i += 1
            digest = hashlib.sha256(rid.encode()).digest()
            body = {"request_id": rid, "key_id": key["key_id"], "scheme": "secp256k1_digest",
                    "payload": "0x" + digest.hex()}  # fmt: skip
            sent.append(rid)
            t0 = time.perf_counter()
            try:
                async with http.post(f"{url}/v1/sign", json=body) as r:
                    out = await r.json()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)
            label = f"{status} {out.get('status') or out.get('error', {}).get('code')}"
            statuses[label] = statuses.get(label, 0) + 1
            got = out.get("request_id")
            answered[got] = answered.get(got, 0) + 1
            if status == 200 and out.get("status") == "ok" and i % 10 == 0:  # a sample: the CPU is shared
                sigs.check(digest, bytes.fromhex(out["signature"][2:]))

    async def sample_rss() -> None:
        while time.monotonic() < stop_at:
            await asyncio.sleep(1)
            rss_mib.append(rss_kb(gateway_pid) / 1024)
            progress(f"load: {len(latencies)} calls answered")

    connector = aiohttp.TCPConnector(limit=profile.callers)
    async with aiohttp.ClientSession(headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:  # fmt: skip
        t0 = time.perf_counter()
        await asyncio.gather(sample_rss(), *(caller(http, n) for n in range(profile.callers)))
        elapsed = time.perf_counter() - t0
    rss_mib.append(rss_kb(gateway_pid) / 1024)
    unanswered = len(set(sent) - set(answered))
    twice = sum(1 for v in answered.values() if v > 1)
    foreign = len(set(answered) - set(sent))
    return {
        "callers": profile.callers,
        "seconds": round(elapsed, 1),
        "calls": len(sent),
        "per_second": round(len(sent) / elapsed),
        "statuses": statuses,
        "unanswered": unanswered,
        "answered_twice": twice,
        "answers_for_another_call": foreign,
        "every_call_answered_once": unanswered == 0 and twice == 0 and foreign == 0,
        "latency_ms": _percentiles(latencies),
        "gateway_rss_mib": {
            "start": round(rss_mib[0], 1),
            "max": round(max(rss_mib), 1),
            "end": round(rss_mib[-1], 1),
            "samples": len(rss_mib),
        },
    }


async def run_gateway_bench(out: Path, profile: GatewayProfile, bootstrap: str = "") -> dict[str, Any]:
    """The whole run; `bootstrap`: an existing Kafka to use (else a local one is started and stopped)."""
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    work = Path(tempfile.mkdtemp(prefix="signer-bench-gw-"))
    tag = uuid.uuid4().hex[:6]
    layout = replace(TopicLayout(), requests=f"bg{tag}.requests", results=f"bg{tag}.results",
                     dlq=f"bg{tag}.dlq", admin=f"bg{tag}.admin", admin_replies=f"bg{tag}.admin.replies",
                     request_partitions=4, result_partitions=2)  # fmt: skip
    topo = Topology(work, log_dir=work / "logs", bootstrap=bootstrap, layout=layout, group_id=f"bg-{tag}",
                    log_level="WARNING")  # fmt: skip
    token = uuid.uuid4().hex
    (work / "clients.json").write_text(
        json.dumps({"bench": {"token_sha256": hashlib.sha256(token.encode()).hexdigest()}})
    )
    headers = {"Authorization": f"Bearer {token}"}
    try:
        if not bootstrap:
            progress("starting Kafka")
            await topo.start_kafka()
        progress("starting the dev KMS, an enclave, a host and a gateway")
        await topo.start_kms()
        await topo.provision()
        await topo.start_enclave("enc0")
        await topo.start_host(timeout=90)
        key = await topo.operator().create_key("secp256k1", "default")
        gateway = await topo.start_gateway(settings={"SIGNER_GATEWAY_CLIENTS": str(work / "clients.json")})
        url = gateway.address
        sigs = _Signatures(key["public_key"])
        direct = _KafkaPath(topo.bootstrap, layout)
        await direct.start()
        try:
            async with aiohttp.ClientSession(headers=headers) as http:
                overhead = await _overhead(http, url, direct, key, sigs, gateway.pid, profile)
        finally:
            await direct.stop()
        load = await _load(url, headers, key, sigs, gateway.pid, profile)
    finally:
        await topo.aclose()
    progress("done")
    print(file=sys.stderr)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "overhead": overhead,
        "load": load,
        "bad_signatures": sigs.bad,
    }
    (out / "gateway.json").write_text(json.dumps(report, indent=2))
    (out / "gateway.md").write_text(markdown(report))
    return report


def markdown(r: dict[str, Any]) -> str:
    o, ld = r["overhead"], r["load"]
    gw, kf = o["gateway"]["latency_ms"], o["kafka"]["latency_ms"]
    rss = ld["gateway_rss_mib"]
    return "\n".join([
        "# Gateway benchmark (`python -m bench gateway`)",
        "",
        f"Machine: {r['machine']}. One enclave worker, one host, one gateway, one Kafka broker.",
        "",
        f"## Overhead at a low rate ({o['rate_per_second_each']:g}/s on each path, {o['seconds']:g} s, interleaved)",
        "",
        "| path | requests | p50 ms | p99 ms | failures |",
        "|---|---|---|---|---|",
        f"| Kafka (produce, read the result) | {o['kafka']['requests']} | {kf['p50']} | {kf['p99']} "
        f"| {o['kafka']['failures']} |",
        f"| HTTP gateway (`POST /v1/sign`) | {o['gateway']['calls']} | {gw['p50']} | {gw['p99']} "
        f"| {o['gateway']['failures']} |",
        f"| added by the gateway | | {o['added_ms']['p50']} | {o['added_ms']['p99']} | |",
        "",
        f"CPU: the gateway process {o['gateway_cpu_us_per_call']} us per call; the bench process "
        f"{o['bench_cpu_us_per_request']} us per request (both paths, the HTTP client included).",
        "",
        f"## {ld['callers']} concurrent callers for {ld['seconds']:g} s (closed loop)",
        "",
        f"- {ld['calls']} calls ({ld['per_second']}/s); answers: {ld['statuses']}",
        f"- every call answered exactly once: {ld['every_call_answered_once']} (unanswered {ld['unanswered']}, "
        f"answered twice {ld['answered_twice']}, answers for another call {ld['answers_for_another_call']})",
        f"- latency p50 {ld['latency_ms']['p50']} ms, p99 {ld['latency_ms']['p99']} ms",
        f"- gateway RSS: {rss['start']} MiB at the start, {rss['max']} MiB at most, {rss['end']} MiB at the end "
        f"({rss['samples']} samples)",
        f"- signatures that did not verify: {r['bad_signatures']}",
        "",
    ])  # fmt: skip
