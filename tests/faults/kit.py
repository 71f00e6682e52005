"""What the Kafka-level fault tests share: a stage (dev KMS, enclaves, keys, hosts over a given
Kafka), a paced load that remembers where each request landed, a collector that keeps every
result's bytes and timestamp, the accounting every scenario ends with, the group's committed
offsets, host metrics and logs, and a summary table ($SIGNER_ARTIFACTS/faults-kafka-summary.md).

The accounting: every request id gets results that are byte-identical but for the diagnostic
fields `timings_us` and `enclave_id` (duplicates from redelivery are allowed, different signed
content is not), every valid request ends `ok`, and every signature recovers the key's address
with eth-account. Whole-record identical duplicates are counted separately: a redone result
carries its own timings, so it is rarely byte-identical as a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from eth_account import Account

from broker.topics import TopicLayout
from signer.topology import Enclaves, HostProcess, Topology
from tests.conftest import ROOT

LONG = bool(os.environ.get("SIGNER_LONG_FAULTS"))
LONG_REASON = "long fault scenario: set SIGNER_LONG_FAULTS=1"

# hosts notice a dead or hung enclave within 2 s and a silent host is out of the group within 6 s
HOST_SETTINGS = {"SIGNER_SESSION_TIMEOUT_MS": "6000", "SIGNER_DEAD_AFTER_MS": "2000",
                 "SIGNER_HEARTBEAT_INTERVAL_MS": "300", "SIGNER_MAX_IN_FLIGHT": "2000"}  # fmt: skip
LOAD_CLIENT = "fault-load"  # the client id of the test's request producer (the hosts' is signer-host)


@dataclass
class Stage:
    """A topology (signer/topology.py) on a Kafka it does not own, with keys created."""

    topology: Topology
    keys: list[dict[str, Any]] = field(default_factory=list)
    per_host: dict[str, Mapping[str, str]] = field(default_factory=dict)  # each host's own settings

    async def start_host(self, name: str, settings: Mapping[str, str] | None = None) -> HostProcess:
        """Start (or start again) host `name`, with the settings it was first started with."""
        if settings is not None:
            self.per_host[name] = settings
        return await self.topology.start_host(name, settings=self.per_host.get(name))

    @property
    def layout(self) -> TopicLayout:
        assert self.topology.layout is not None
        return self.topology.layout

    @property
    def group(self) -> str:
        assert self.topology.group_id is not None
        return self.topology.group_id

    @property
    def addresses(self) -> dict[str, str]:
        return {k["key_id"]: k["address"] for k in self.keys}

    def log(self, name: str) -> str:
        path = self.topology.data_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def new_stage(tmp: Path, sock_dir: Path, bootstrap: str, layout: TopicLayout,
              settings: Mapping[str, str] | None = None) -> Stage:  # fmt: skip
    """A topology over `bootstrap` with nothing started yet: start it with populate() inside the
    scope that closes it (topology.aclose(kill=True))."""
    topo = Topology(tmp, sock_dir=sock_dir, log_dir=tmp, bootstrap=bootstrap, layout=layout,
                    group_id=f"g-{layout.requests}", host_settings={**HOST_SETTINGS, **(settings or {})},
                    log_level="INFO")  # fmt: skip
    return Stage(topo)


async def populate(stage: Stage, hosts: list[str], enclaves: int = 2, keys: int = 6,
                   per_host: Mapping[str, Mapping[str, str]] | None = None) -> None:  # fmt: skip
    """The dev KMS, the dev enclave configuration, enclave workers e0.., the hosts (with their
    own `per_host` settings), and keys in three keyrings."""
    topo = stage.topology
    await topo.start_kms()
    await topo.provision()
    await topo.start_enclaves(Enclaves(enclaves, "e"))
    for name in hosts:
        await stage.start_host(name, (per_host or {}).get(name))
    operator = topo.operator()
    for i in range(keys):
        stage.keys.append(await operator.create_key("secp256k1", f"r{i % 3}"))


def request(stage: Stage, i: int, prefix: str) -> dict[str, Any]:
    """A valid secp256k1_digest request, the same for the same (i, prefix)."""
    keys = stage.keys
    return {"v": 1, "request_id": f"{prefix}{i}", "key_id": keys[i % len(keys)]["key_id"], "scheme": "secp256k1_digest",
            "payload": random.Random(f"{prefix}{i}").randbytes(32)}  # fmt: skip


def requests(stage: Stage, n: int, prefix: str) -> list[dict[str, Any]]:
    return [request(stage, i, prefix) for i in range(n)]


class Load:
    """Produces requests (key = key_id) at a fixed rate, in the background; `placed` maps each
    request id to the (partition, offset) the broker acknowledged for it. With `partitions`, the
    n-th request goes to partition n % partitions rather than to its key's: a handful of keys
    would leave some partitions empty, and a host owning only those would have nothing to do."""

    def __init__(self, bootstrap: str, topic: str, partitions: int | None = None, **producer: Any) -> None:
        self.bootstrap, self.topic, self.partitions = bootstrap, topic, partitions
        self.placed: dict[str, tuple[int, int]] = {}
        self.sent_ms: dict[str, int] = {}  # request id -> wall clock (ms) when it was handed to the producer
        self.sent = 0
        self._producer_opts = producer
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> Load:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, client_id=LOAD_CLIENT, acks="all",
                                          enable_idempotence=True, request_timeout_ms=60_000, retry_backoff_ms=200,
                                          **self._producer_opts)  # fmt: skip
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def run(self, reqs: list[dict[str, Any]], rate: float) -> None:
        """Send `reqs` at `rate` per second; return once every one is acknowledged."""
        assert self._producer is not None
        acks = []
        t0 = time.monotonic()
        for i, req in enumerate(reqs):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            fut = await self._send(req)
            acks.append(fut)
            self.sent += 1
        await asyncio.gather(*acks)

    async def _send(self, req: dict[str, Any]) -> asyncio.Future[Any]:
        assert self._producer is not None
        partition = self.sent % self.partitions if self.partitions else None
        self.sent_ms[req["request_id"]] = int(time.time() * 1000)
        fut = await self._producer.send(self.topic, msgpack.packb(req), key=req["key_id"].encode(), partition=partition)
        fut.add_done_callback(self._placed_cb(req["request_id"]))
        return fut

    def _placed_cb(self, rid: str) -> Callable[[asyncio.Future[Any]], None]:
        def placed(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                md = fut.result()
                self.placed[rid] = (md.partition, md.offset)

        return placed

    def start(self, reqs: list[dict[str, Any]], rate: float) -> asyncio.Task[None]:
        return asyncio.create_task(self.run(reqs, rate), name="load")

    async def stream(self, make: Callable[[int], dict[str, Any]], rate: float, until: asyncio.Event,
                     sent: list[dict[str, Any]]) -> None:  # fmt: skip
        """Send make(0), make(1), ... at `rate` per second until `until` is set (appending each to
        `sent`); return once every one is acknowledged."""
        assert self._producer is not None
        acks = []
        t0 = time.monotonic()
        i = 0
        while not until.is_set():
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await until.wait()
                continue
            req = make(i)
            acks.append(await self._send(req))
            sent.append(req)
            self.sent += 1
            i += 1
        await asyncio.gather(*acks)

    def by_offset(self) -> dict[int, dict[int, str]]:
        out: dict[int, dict[int, str]] = {}
        for rid, (p, off) in self.placed.items():
            out.setdefault(p, {})[off] = rid
        return out


@dataclass
class Result:
    raw: bytes
    value: dict[str, Any]
    partition: int
    offset: int
    timestamp_ms: int


class Collector:
    """Reads the results and DLQ topics from the beginning, in the background, keeping each
    result's bytes; `isolation_level` read_committed for exactly-once scenarios."""

    def __init__(self, bootstrap: str, layout: TopicLayout, isolation_level: str = "read_uncommitted") -> None:
        self.bootstrap, self.layout, self.isolation_level = bootstrap, layout, isolation_level
        self.results: dict[str, list[Result]] = {}
        self.dlq: list[dict[str, Any]] = []
        self.total = 0
        self.read_errors = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        self.consumer = AIOKafkaConsumer(self.layout.results, self.layout.dlq, bootstrap_servers=self.bootstrap,
                                         auto_offset_reset="earliest", enable_auto_commit=False,
                                         isolation_level=self.isolation_level, client_id="fault-collector")  # fmt: skip
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name="collector")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    async def _run(self) -> None:
        while True:
            try:
                batch = await self.consumer.getmany(timeout_ms=200)
            except Exception:  # a broker may be down or moving: keep reading
                self.read_errors += 1
                await asyncio.sleep(0.2)
                continue
            for recs in batch.values():
                for rec in recs:
                    assert rec.value is not None
                    m = msgpack.unpackb(rec.value, raw=False)
                    if rec.topic == self.layout.dlq:
                        self.dlq.append(m)
                    else:
                        self.results.setdefault(m["request_id"], []).append(
                            Result(rec.value, m, rec.partition, rec.offset, rec.timestamp)
                        )
                        self.total += 1
            if batch:
                self._changed.set()

    async def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {self.total} results, "
                                 f"{len(self.results)} ids") from None  # fmt: skip

    async def wait_results(self, n: int, timeout: float = 120) -> None:
        await self.wait(lambda: self.total >= n, timeout, f"{n} results")

    async def wait_ids(self, ids: set[str], timeout: float = 180) -> None:
        await self.wait(lambda: ids <= self.results.keys(), timeout, f"{len(ids)} request ids answered")

    def produced_between(self, t0_ms: int, t1_ms: int) -> int:
        return sum(1 for rs in self.results.values() for r in rs if t0_ms <= r.timestamp_ms < t1_ms)

    async def read_to_end(self, timeout: float = 60) -> None:
        """Until the collector has read every partition of the results and DLQ topics up to the end
        offsets they have now (call once the group has committed everything: every output is then
        written, duplicates included)."""
        parts = [TopicPartition(t, p) for t in (self.layout.results, self.layout.dlq)
                 for p in self.consumer.partitions_for_topic(t) or ()]  # fmt: skip
        assert parts, "the collector knows no partition of the results and DLQ topics"
        ends = await self.consumer.end_offsets(parts)

        async def behind() -> list[TopicPartition]:
            return [tp for tp in parts if await self.consumer.position(tp) < ends[tp]]

        left = await behind()
        try:
            async with asyncio.timeout(timeout):
                while left:
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await self._changed.wait()
                    left = await behind()
        except TimeoutError:
            raise AssertionError(f"collector not at the end offsets {ends} after {timeout}s: {left}") from None


# Fields of a SignResult that describe how it was produced rather than what was signed: a redone
# result carries its own timings (and may come from another enclave), so two results for one
# request are never byte-identical as records; everything else must be.
DIAGNOSTIC_FIELDS = ("timings_us", "enclave_id")


def signed_part(value: dict[str, Any]) -> bytes:
    """A result's bytes without its diagnostic fields (msgpack, keys in the result's own order)."""
    return msgpack.packb({k: v for k, v in value.items() if k not in DIAGNOSTIC_FIELDS}, use_bin_type=True)


@dataclass
class Accounting:
    requests: int
    results: int
    duplicates: int  # results beyond one per request id, identical but for the diagnostic fields
    ids_with_duplicates: int
    identical_records: int  # of the duplicates, those byte-identical as whole records
    lost: int = 0  # requests with no result (and no DLQ record naming them)


def tally(reqs: list[dict[str, Any]], col: Collector) -> Accounting:
    """The counts of `account`, without its checks (for a summary row written before them)."""
    dlq_named = {d.get("request_id") for d in col.dlq}
    got = [col.results.get(r["request_id"], []) for r in reqs]
    lost = sum(1 for r, rs in zip(reqs, got, strict=True) if not rs and r["request_id"] not in dlq_named)
    n = sum(len(rs) for rs in got)
    dup_ids = sum(1 for rs in got if len(rs) > 1)
    identical = sum(1 for rs in got for r in rs[1:] if r.raw == rs[0].raw)
    return Accounting(len(reqs), n, n - sum(1 for rs in got if rs), dup_ids, identical, lost)


def account(reqs: list[dict[str, Any]], col: Collector, addresses: dict[str, str], *,
            others: Collection[str] = (), dlq: bool = False) -> Accounting:  # fmt: skip
    """Every request answered; its results identical (whole records, but for DIAGNOSTIC_FIELDS);
    `ok` with a signature that recovers its key's address (eth-account). Results for the ids in
    `others` and, with `dlq`, DLQ records are other inputs' (checked by the caller); no DLQ record
    may name one of `reqs`."""
    missing = [r["request_id"] for r in reqs if r["request_id"] not in col.results]
    assert not missing, f"{len(missing)} requests lost, e.g. {missing[:5]}"
    for req in reqs:
        got = col.results[req["request_id"]]
        assert len({signed_part(r.value) for r in got}) == 1, (
            f"{req['request_id']}: results differ: {[r.value for r in got]}"
        )
        res = got[0].value
        assert res["status"] == "ok", f"{req['request_id']} ended {res['status']}: {res.get('error')}"
        sig = res["signature"]
        vrs = (sig[64] + 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
        assert Account._recover_hash(req["payload"], vrs=vrs) == addresses[req["key_id"]], req["request_id"]
    ours = {r["request_id"] for r in reqs}
    stray = set(col.results) - ours - set(others)
    assert not stray, f"results for unknown request ids: {sorted(stray)[:5]}"
    if dlq:
        named = [d for d in col.dlq if d.get("request_id") in ours]
        assert not named, f"DLQ records for valid requests: {named[:3]}"
    else:
        assert not col.dlq, f"DLQ records for valid requests: {col.dlq[:3]}"
    return tally(reqs, col)


# -- the group's offsets, host metrics and logs -------------------------------------------------------


async def group_offsets(bootstrap: str, group: str, layout: TopicLayout) -> tuple[dict[int, int], dict[int, int]]:
    """{partition: committed offset (0 if none)} and {partition: log end offset} of the requests topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="fault-offsets")
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="fault-offsets")
    await consumer.start()
    try:
        parts = [TopicPartition(layout.requests, p) for p in range(layout.request_partitions)]
        ends = await consumer.end_offsets(parts)
    finally:
        await consumer.stop()
    got = {tp.partition: committed[tp].offset for tp in parts if tp in committed}
    return {p.partition: max(0, got.get(p.partition, 0)) for p in parts}, {
        tp.partition: off for tp, off in ends.items()
    }


async def wait_all_committed(bootstrap: str, group: str, layout: TopicLayout, timeout: float = 60) -> None:
    """Until the group's committed offset of every request partition is its log end."""
    last: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(Exception):  # a coordinator may be moving
                    last = await group_offsets(bootstrap, group, layout)
                    if last[0] == last[1]:
                        return
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"offsets not all committed after {timeout}s: committed, end = {last}") from None


async def scrape(url: str, timeout: float = 5) -> str:
    """A host's /metrics (Prometheus text)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
        s.get(f"{url}/metrics") as resp,
    ):
        return await resp.text()


def metric(text: str, name: str, **labels: str) -> float:
    """The samples of metric `name` (with at least these label values) summed, from /metrics text."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith((f"{name} ", f"{name}{{")) and all(w in line.split("}")[0] for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def host_signed(url: str) -> float:
    """signer_requests_total summed over schemes and statuses, from a host's /metrics."""
    return metric(await scrape(url), "signer_requests_total")


def rss_kb(pid: int) -> int:
    """A process's resident set (VmRSS), in kB; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def log_events(log: str, event: str) -> list[dict[str, Any]]:
    """The structlog JSON lines of one event in a host's log."""
    out = []
    for line in log.splitlines():
        if f'"{event}"' in line:
            with contextlib.suppress(ValueError):
                rec = json.loads(line[line.index("{") :])
                if rec.get("event") == event:
                    out.append(rec)
    return out


# -- summary -----------------------------------------------------------------------------------------

SUMMARY: list[dict[str, Any]] = []
SUMMARY_FILE = "faults-kafka-summary.md"
SUMMARIES: dict[str, list[dict[str, Any]]] = {SUMMARY_FILE: SUMMARY}  # file name -> its rows


def record(scenario: str, acc: Accounting, seconds: float, hit: str, *, file: str = SUMMARY_FILE,
           extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
    """A summary row in $SIGNER_ARTIFACTS/`file`; `extra` columns (the same for every row of a file)
    come after "ids redone"."""
    rows = SUMMARIES.setdefault(file, [])
    rows.append({"scenario": scenario, "requests": acc.requests, "results": acc.results, "lost": acc.lost,
                 "duplicates": acc.duplicates, "identical": acc.identical_records,
                 "dup_ids": acc.ids_with_duplicates, "extra": dict(extra or {}), "seconds": round(seconds, 1),
                 "hit": hit})  # fmt: skip
    out = Path(os.environ.get("SIGNER_ARTIFACTS", ROOT / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    extras = list(rows[0]["extra"])
    head = ["scenario", "requests", "results", "lost", "duplicates (same signed part)",
            "of them whole-record identical", "ids redone", *extras, "test time, s", "fault hit work"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        cells = [s["scenario"], s["requests"], s["results"], s["lost"], s["duplicates"], s["identical"],
                 s["dup_ids"], *(s["extra"].get(k, "") for k in extras), s["seconds"], s["hit"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (out / file).write_text("\n".join(lines) + "\n")


# -- hosts that die ----------------------------------------------------------------------------------


class Supervisor:
    """Starts a host process again when it dies, as the deployment's systemd unit does
    (deploy/nitro/systemd/signer-host.service: Restart=always), so a scenario can go on; every
    death is listed in `unexpected`, which `check()` turns into a failure. Hosts stopped on purpose are announced with `expect_exit`."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.unexpected: list[str] = []
        self.expected: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Supervisor:
        self._task = asyncio.create_task(self._run(), name="supervisor")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def expect_exit(self, *names: str) -> None:
        self.expected.update(names)

    async def _run(self) -> None:
        topo = self.stage.topology
        while True:
            await asyncio.sleep(0.2)  # polls the host processes' exit
            for name, host in list(topo.hosts.items()):
                if name in self.expected or host.process.running:
                    continue
                code = host.process.stop()  # reaped: closes its log
                log = self.stage.log(name)
                self.unexpected.append(f"{name} exited {code}: {log[-1500:]}")  # any host death fails the test
                await self.stage.start_host(name)

    def check(self) -> None:
        """Fails on any host death (call after the accounting)."""
        assert not self.unexpected, self.unexpected
