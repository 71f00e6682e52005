"""Fault injection: the real cluster (Kafka, dev KMS, two enclave and two host processes) under
steady load, one fault per scenario. For every scenario every produced record is accounted for:
each request id gets exactly one distinct result (verified with eth-account when `ok`) or a DLQ
record, never none; no two results for one id differ; every process not killed still serves;
host memory stays under a bound. A summary table is written to $SIGNER_ARTIFACTS (default
./artifacts)/faults-summary.md.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from eth_account import Account

from broker.local_kafka import LocalKafka
from broker.topics import TopicLayout
from schemas.transport import UnixTransport, transport_for
from signer.topology import ChildProcess, Enclaves, Topology
from tests.conftest import ROOT
from tests.transports import FaultyTransport

SUMMARY: list[dict[str, Any]] = []
HOST_RSS_BOUND_KB = 500 * 1024


@dataclass
class Cluster:
    """The topology under test (signer/topology.py), the keys created in it and what a scenario killed."""

    topology: Topology
    killed: set[str] = field(default_factory=set)
    keys: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tmp(self) -> Path:
        return self.topology.data_dir

    @property
    def layout(self) -> TopicLayout:
        assert self.topology.layout is not None
        return self.topology.layout

    @property
    def kafka(self) -> LocalKafka:
        assert self.topology.kafka is not None
        return self.topology.kafka

    @property
    def kms_url(self) -> str:
        return self.topology.kms_url

    @property
    def hosts(self) -> dict[str, ChildProcess]:
        return {name: h.process for name, h in self.topology.hosts.items()}

    @property
    def enclaves(self) -> dict[str, ChildProcess]:
        return {name: e.process for name, e in self.topology.enclaves.items()}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.topology.process(name).stop(sig, timeout=10)
        self.killed.add(name)


# hosts notice a dead or hung enclave within 2 s and a dead host's partitions move within 6 s
HOST_SETTINGS = {"SIGNER_SESSION_TIMEOUT_MS": "6000", "SIGNER_DEAD_AFTER_MS": "2000",
                 "SIGNER_HEARTBEAT_INTERVAL_MS": "300", "SIGNER_MAX_IN_FLIGHT": "2000"}  # fmt: skip


async def make_cluster(tmp: Path, sock_dir: Path) -> Cluster:
    layout = TopicLayout(request_partitions=6, result_partitions=3)
    topo = Topology(tmp, sock_dir=sock_dir, log_dir=tmp, layout=layout, group_id=f"g-{layout.requests}",
                    host_settings=HOST_SETTINGS, log_level="INFO")  # fmt: skip
    c = Cluster(topo)
    try:
        await topo.start_kafka()
        await topo.start_kms()
        await topo.provision()
        await topo.start_enclaves(Enclaves(2, "e"))
        for name in ("h0", "h1"):
            await topo.start_host(name)
        operator = topo.operator()
        for i in range(6):
            c.keys.append(await operator.create_key("secp256k1", f"r{i % 3}"))
    except BaseException:
        await topo.aclose(kill=True)
        raise
    return c


@pytest.fixture
async def cluster(tmp_path: Path) -> Any:
    sock_dir = Path("/tmp") / f"flt-{os.urandom(4).hex()}"
    sock_dir.mkdir()
    c = await make_cluster(tmp_path, sock_dir)
    try:
        yield c
    finally:
        await c.topology.aclose(kill=True)
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()


def digest(i: int, keys: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    return {"v": 1, "request_id": f"{prefix}{i}", "key_id": keys[i % len(keys)]["key_id"], "scheme": "secp256k1_digest",
            "payload": random.Random(i).randbytes(32)}  # fmt: skip


class Collector:
    """Reads results and the DLQ from the beginning, in the background."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.dlq: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        self.consumer = AIOKafkaConsumer(self.c.layout.results, self.c.layout.dlq, bootstrap_servers=self.c.kafka.bootstrap,
                                         auto_offset_reset="earliest", enable_auto_commit=False)  # fmt: skip
        await self.consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            try:
                batch = await self.consumer.getmany(timeout_ms=200)
            except Exception:  # the broker may be restarting: keep trying
                await asyncio.sleep(0.2)
                continue
            for recs in batch.values():
                for rec in recs:
                    m = msgpack.unpackb(rec.value, raw=False)
                    if rec.topic == self.c.layout.dlq:
                        self.dlq.append(m)
                    else:
                        self.results.setdefault(m["request_id"], []).append(m)

    def answered(self) -> set[str]:
        """Request ids with a result or a DLQ record that names them."""
        return set(self.results) | {d["request_id"] for d in self.dlq if d.get("request_id")}

    async def wait_for(self, ids: set[str], dlq: int, timeout: float = 150) -> None:
        async with asyncio.timeout(timeout):
            while not (ids <= self.answered() and len({bytes(d["original"]) for d in self.dlq}) >= dlq):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # duplicates published right after would show here

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()


async def produce(c: Cluster, values: list[tuple[bytes, bytes]], rate: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=c.kafka.bootstrap, acks="all", enable_idempotence=True,
                                request_timeout_ms=60_000, retry_backoff_ms=200)  # fmt: skip
    await producer.start()
    try:
        t0 = time.monotonic()
        for i, (key, value) in enumerate(values):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send(c.layout.requests, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


def check_result(req: dict[str, Any], results: list[dict[str, Any]], addresses: dict[str, str]) -> None:
    distinct = {(r["status"], r.get("signature"), (r.get("error") or {}).get("code")) for r in results}
    assert len(distinct) == 1, f"{req['request_id']}: results differ: {distinct}"
    res = results[0]
    if res["status"] == "ok":
        sig = res["signature"]
        vrs = (sig[64] + 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
        assert Account._recover_hash(req["payload"], vrs=vrs) == addresses[req["key_id"]]
    else:
        assert (res.get("error") or {}).get("code"), res


async def host_metric_ok(c: Cluster) -> None:
    """Every process that was not killed is still serving; host memory under the bound."""
    for name, proc in {**c.hosts, **c.enclaves}.items():
        if name in c.killed:
            continue
        assert proc.running, f"{name} exited"
    for name, proc in c.hosts.items():
        if name in c.killed:
            continue
        rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{proc.pid}/status").read_text()).group(1))
        assert rss < HOST_RSS_BOUND_KB, f"{name} RSS {rss} kB"


async def run_scenario(c: Cluster, name: str, fault: Callable[[], Awaitable[None]], n: int = 1500, rate: float = 300,
                       extra: list[tuple[dict[str, Any] | None, bytes]] | None = None) -> None:  # fmt: skip
    reqs = [digest(i, c.keys, "s") for i in range(n)]
    values = [(r["key_id"].encode(), msgpack.packb(r)) for r in reqs]
    extra = extra or []
    values += [
        ((m or {}).get("key_id", "junk").encode() if isinstance((m or {}).get("key_id"), str) else b"junk", raw)
        for m, raw in extra
    ]  # type: ignore[union-attr]
    random.Random(5).shuffle(values)
    addresses = {k["key_id"]: k["address"] for k in c.keys}
    t_fault = t_recovered = 0.0
    async with Collector(c) as col:
        producing = asyncio.create_task(produce(c, values, rate))
        await asyncio.sleep(n / rate / 3)  # a third of the way in
        t_fault = time.monotonic()
        await fault()
        await producing
        named = [m for m, _ in extra if m is not None and isinstance(m.get("request_id"), str)]
        want = {r["request_id"] for r in reqs} | {m["request_id"] for m in named}
        await col.wait_for(want, dlq=len([1 for m, _ in extra if m is None]))
        t_recovered = time.monotonic()
        for req in reqs:
            check_result(req, col.results[req["request_id"]], addresses)
        for m in named:
            got = col.results.get(m["request_id"], [])
            if not got:  # refused before signing: its DLQ record names it
                assert any(d.get("request_id") == m["request_id"] for d in col.dlq)
                continue
            assert len({(r["status"], (r.get("error") or {}).get("code"), r.get("signature")) for r in got}) == 1
            assert got[0]["status"] != "ok" and got[0]["error"]["code"], (m["request_id"], got[0])
        garbage = {raw for m, raw in extra if m is None}
        assert garbage <= {bytes(d["original"]) for d in col.dlq}
        duplicates = sum(len(v) - 1 for v in col.results.values())
        await host_metric_ok(c)
        SUMMARY.append({"scenario": name, "requests": len(values), "results": sum(len(v) for v in col.results.values()),
                        "dlq": len(col.dlq), "lost": 0, "duplicates": duplicates,
                        "recovery_s": round(t_recovered - t_fault, 1)})  # fmt: skip
        write_summary()


def write_summary() -> None:
    out = Path(os.environ.get("SIGNER_ARTIFACTS", ROOT / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| scenario | requests | results | DLQ | lost | duplicates (identical) | time to all answered, s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {s['scenario']} | {s['requests']} | {s['results']} | {s['dlq']} | {s['lost']} | {s['duplicates']} | "
              f"{s['recovery_s']} |" for s in SUMMARY]  # fmt: skip
    (out / "faults-summary.md").write_text("\n".join(lines) + "\n")


async def test_sigkill_of_a_host(cluster: Cluster) -> None:
    async def fault() -> None:
        cluster.kill("h0")

    await run_scenario(cluster, "SIGKILL host", fault)


async def test_sigkill_of_an_enclave(cluster: Cluster) -> None:
    async def fault() -> None:
        cluster.kill("e0")

    await run_scenario(cluster, "SIGKILL enclave", fault)


async def test_sigstop_of_an_enclave(cluster: Cluster) -> None:
    async def fault() -> None:
        cluster.enclaves["e1"].send_signal(signal.SIGSTOP)
        await asyncio.sleep(4)  # longer than the hosts' 2 s dead-after
        cluster.enclaves["e1"].send_signal(signal.SIGCONT)

    await run_scenario(cluster, "SIGSTOP enclave 4 s", fault)


async def test_kafka_broker_restart(cluster: Cluster) -> None:
    async def fault() -> None:
        await asyncio.to_thread(cluster.kafka.stop)
        await asyncio.to_thread(cluster.kafka.start)

    await run_scenario(cluster, "Kafka broker restart", fault)


async def test_kms_down_then_back(cluster: Cluster) -> None:
    async def fault() -> None:
        await cluster.topology.stop_kms()
        cluster.kill("e0")  # a fresh enclave process has no data key cached: it needs KMS
        cluster.killed.discard("e0")
        await cluster.topology.start_enclave("e0")
        await asyncio.sleep(3)
        await cluster.topology.start_kms()  # at the same address: the enclave configuration names it

    await run_scenario(cluster, "KMS down 3 s (cold enclave)", fault)


async def test_kms_throttling(cluster: Cluster) -> None:
    async def fault() -> None:
        async with aiohttp.ClientSession() as s:
            await s.post(f"{cluster.kms_url}/_dev/throttle", json={"next": 8})
        cluster.kill("e1")  # cold again: its keyrings must be unwrapped under throttling
        cluster.killed.discard("e1")
        await cluster.topology.start_enclave("e1")

    await run_scenario(cluster, "KMS throttling (8 calls)", fault)


async def test_producers_far_above_the_sustainable_rate(cluster: Cluster) -> None:
    async def fault() -> None:
        return None  # the fault is the load itself: a burst as fast as one producer can send

    await run_scenario(cluster, "burst: 8000 at producer speed", fault, n=8000, rate=100_000)


async def test_a_link_that_corrupts_and_drops_bytes(cluster: Cluster) -> None:
    c = cluster
    enclaves = c.topology.enclaves
    link = FaultyTransport(transport_for(enclaves["e0"].url))
    faulty = c.topology.sock_dir / "faulty.sock"
    relay = await link.relay(UnixTransport(str(faulty)))  # a proxy in front of e0
    proxied = f"unix://{faulty}"
    for name in ("h0", "h1"):  # the hosts reach e0 only through the faulty link
        c.hosts[name].stop()
    for name in ("h0", "h1"):
        await c.topology.start_host(name, enclaves=[proxied, enclaves["e1"].url])

    async def fault() -> None:
        link.corrupt_next = True
        await asyncio.sleep(1.0)
        link.cut_next = True

    try:
        await run_scenario(c, "link corrupts a byte, then drops mid-frame", fault)
    finally:
        relay.close()
        await link.aclose()
    host_logs = "".join((c.tmp / f"{h}.log").read_text() for h in ("h0", "h1"))
    assert "channel_lost" in host_logs and "faulty.sock" in host_logs  # the faults really hit a connection
    assert (link.corrupted, link.cuts) == (1, 1)


async def test_hostile_inputs(cluster: Cluster) -> None:
    c = cluster
    rnd = random.Random(99)
    valid = msgpack.packb(digest(0, c.keys, "x"))
    extra: list[tuple[dict[str, Any] | None, bytes]] = []
    for i in range(150):  # random and mutated msgpack: to the DLQ (or, if a mutation still decodes, a coded result)
        raw = rnd.randbytes(rnd.randint(1, 80)) if i % 2 else bytearray(valid)
        if isinstance(raw, bytearray):
            for _ in range(3):
                raw[rnd.randrange(len(raw))] = rnd.randrange(256)
            raw = bytes(raw)
        try:
            msgpack.unpackb(raw, raw=False)
            continue  # still decodable: skip rather than guess its fate
        except Exception:
            extra.append((None, raw))
    extra.append((None, b"\x00" * (300 * 1024)))  # oversize
    deep: Any = {"v": 1}
    for _ in range(30):
        deep = {"n": deep}
    typed = {
        "types": {"EIP712Domain": [], "T": [{"name": "n", "type": "T"}]},
        "primaryType": "T",
        "domain": {},
        "message": deep,
    }
    cases: list[dict[str, Any]] = [
        {"v": 1, "request_id": "h-deep", "key_id": c.keys[0]["key_id"], "scheme": "eth_typed_data", "payload": typed},
        {"v": 1, "request_id": "h-unknown-key", "key_id": "k_ffffffffffffffffffff", "scheme": "secp256k1_digest", "payload": b"\1" * 32},
        {"v": 1, "request_id": "h-forged", "key_id": c.keys[1]["key_id"], "scheme": "secp256k1_digest", "payload": b"\1" * 32,
         "auth": {"client_id": "mallory", "ts_ms": int(time.time() * 1000), "nonce": b"n" * 16, "sig": b"s" * 64}},
    ]  # fmt: skip
    for field_name in ("v", "request_id", "key_id", "scheme", "payload", "deadline_ms", "reply_topic", "auth"):
        for junk in (True, 1.5, [1], {"a": 1}, -1):
            m = digest(1, c.keys, f"w-{field_name}-{type(junk).__name__}")
            m[field_name] = junk
            extra.append((None if field_name in ("v", "request_id") else m, msgpack.packb(m)))
    extra += [(m, msgpack.packb(m)) for m in cases]

    async def fault() -> None:
        return None

    await run_scenario(c, "hostile inputs", fault, n=600, extra=extra)
