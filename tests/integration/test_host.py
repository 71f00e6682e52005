"""Host workers against the real broker: crashes, exactly-once, backpressure, bad input, shutdown.

Real parts throughout: Kafka, the dev KMS, enclave worker processes, `signer host`
processes. Every request id is counted end to end; signatures are verified with
eth-account.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from eth_account import Account

from broker.topics import TopicLayout
from signer.topology import Enclaves, Topology
from tests.conftest import committed_and_end_offsets, topology

# hosts fail over quickly, and log at INFO to their files (for diagnosis)
HOST_SETTINGS = {"SIGNER_SESSION_TIMEOUT_MS": "6000", "SIGNER_TRANSACTION_TIMEOUT_MS": "8000"}


async def host_cluster(bootstrap: str, layout: TopicLayout, tmp: Path, sock_dir: Path, link: str = "") -> Topology:
    """Dev KMS + two enclave worker processes; `signer host` processes join with start_host()."""
    c = topology(tmp, sock_dir, bootstrap, layout, host_settings=HOST_SETTINGS, log_level="INFO")
    try:
        await c.start_kms()
        await c.provision()
        await c.start_enclaves(Enclaves(2, "enc", link=link))
    except BaseException:
        await c.aclose(kill=True)
        raise
    return c


@pytest.fixture
async def cluster(bootstrap: str, layout: TopicLayout, tmp_path: Path, sock_dir: Path) -> AsyncIterator[Topology]:
    c = await host_cluster(bootstrap, layout, tmp_path, sock_dir)
    try:
        yield c
    finally:
        await c.aclose(kill=True)


async def create_keys(c: Topology, n: int) -> list[dict[str, Any]]:
    operator = c.operator()
    return [await operator.create_key("secp256k1", f"r{i % 3}") for i in range(n)]


def requests_for(keys: list[dict[str, Any]], n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"v": 1, "request_id": f"{prefix}{i}", "key_id": keys[i % len(keys)]["key_id"],
             "scheme": "secp256k1_digest", "payload": os.urandom(32)} for i in range(n)]  # fmt: skip


async def produce(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for key, value in values:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


class ResultReader:
    """Reads a topic from the beginning in the background; groups records by a field."""

    def __init__(self, bootstrap: str, topic: str, field: str = "request_id", read_committed: bool = False):
        self.bootstrap, self.topic, self.field = bootstrap, topic, field
        self.isolation = "read_committed" if read_committed else "read_uncommitted"
        self.by_id: dict[str, list[dict[str, Any]]] = {}
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResultReader:
        self.consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                         enable_auto_commit=False, isolation_level=self.isolation)  # fmt: skip
        await self.consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            for recs in (await self.consumer.getmany(timeout_ms=200)).values():
                for rec in recs:
                    m = msgpack.unpackb(rec.value, raw=False)
                    self.by_id.setdefault(m.get(self.field), []).append(m)
                    self.count += 1

    async def wait_for(self, ids: set[str], timeout: float = 120) -> None:
        async with asyncio.timeout(timeout):
            while not ids <= self.by_id.keys():  # noqa: ASYNC110 - polling what the reader task collects
                await asyncio.sleep(0.05)

    async def settle(self) -> None:
        """Read on until nothing new arrives for a second (duplicates would show up here)."""
        last = -1
        while last != self.count:
            last = self.count
            await asyncio.sleep(1.0)

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib_suppress():
            await self._task
        await self.consumer.stop()


def contextlib_suppress() -> Any:
    import contextlib

    return contextlib.suppress(asyncio.CancelledError)


def check_signed(
    reqs: list[dict[str, Any]], keys: list[dict[str, Any]], by_id: dict[str, list[dict[str, Any]]]
) -> None:
    addresses = {k["key_id"]: k["address"] for k in keys}
    for req in reqs:
        got = by_id[req["request_id"]]
        assert all(g["signature"] == got[0]["signature"] for g in got), "redone results must carry the same bytes"
        res = got[0]
        assert res["status"] == "ok", res
        sig = res["signature"]
        vrs = (sig[64] + 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
        assert Account._recover_hash(req["payload"], vrs=vrs) == addresses[req["key_id"]]


async def metric(port: int, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _kill_one_mid_run(c: Topology, read_committed: bool, **host_env: str) -> None:
    await c.start_host("a", settings=host_env)
    await c.start_host("b", settings=host_env)
    keys = await create_keys(c, 12)
    reqs = requests_for(keys, 10_000, "k")
    async with ResultReader(c.bootstrap, c.layout.results, read_committed=read_committed) as reader:
        await produce(c.bootstrap, c.layout.requests, [(r["key_id"].encode(), msgpack.packb(r)) for r in reqs])
        async with asyncio.timeout(60):
            while reader.count < 2000:  # noqa: ASYNC110 - wait until the run is well under way
                await asyncio.sleep(0.02)
        c.hosts["a"].process.stop(signal.SIGKILL)
        await reader.wait_for({r["request_id"] for r in reqs}, timeout=120)
        await reader.settle()
        check_signed(reqs, keys, reader.by_id)
        return_value = reader.by_id
    if read_committed:
        dupes = {k: len(v) for k, v in return_value.items() if len(v) > 1}
        assert not dupes, f"{len(dupes)} request ids have more than one committed result"


async def test_two_hosts_one_killed_mid_run_every_request_gets_a_valid_result(cluster: Topology) -> None:
    await _kill_one_mid_run(cluster, read_committed=False)


async def test_exactly_once_mode_one_result_per_request_across_a_crash(cluster: Topology) -> None:
    await _kill_one_mid_run(cluster, read_committed=True, SIGNER_EXACTLY_ONCE="true")


async def test_producers_outrunning_a_slow_enclave_pause_partitions_and_stay_bounded(
    bootstrap: str, layout: TopicLayout, tmp_path: Path, sock_dir: Path
) -> None:
    c = await host_cluster(bootstrap, layout, tmp_path, sock_dir, link="?latency_ms=40")
    try:
        host = await c.start_host("slow", settings={"SIGNER_MAX_IN_FLIGHT": "300", "SIGNER_RESUME_BELOW": "100",
                                                    "SIGNER_MAX_BATCH": "100", "SIGNER_FRAME_MAX_REQUESTS": "20"})  # fmt: skip
        keys = await create_keys(c, 6)
        reqs = requests_for(keys, 4000, "p")
        port = host.port
        peak_in_flight, paused_seen, peak_rss = 0.0, 0.0, 0
        async with ResultReader(c.bootstrap, c.layout.results) as reader:
            await produce(c.bootstrap, c.layout.requests, [(r["key_id"].encode(), msgpack.packb(r)) for r in reqs])
            async with asyncio.timeout(180):
                while len(reader.by_id) < len(reqs):
                    peak_in_flight = max(peak_in_flight, await metric(port, "signer_in_flight"))
                    paused_seen = max(paused_seen, await metric(port, "signer_paused_partitions"))
                    rss = int(
                        re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{host.process.pid}/status").read_text()).group(1)
                    )
                    peak_rss = max(peak_rss, rss)
                    await asyncio.sleep(0.05)
            check_signed(reqs, keys, reader.by_id)
        assert 0 < peak_in_flight <= 300
        assert paused_seen > 0  # the host really paused its partitions ...
        assert await metric(port, "signer_paused_partitions") == 0  # ... and resumed them
        assert peak_rss < 400 * 1024, f"host RSS peaked at {peak_rss} kB"
    finally:
        await c.aclose(kill=True)


async def test_malformed_records_go_to_the_dlq_while_good_ones_are_signed(cluster: Topology) -> None:
    c = cluster
    await c.start_host("a")
    keys = await create_keys(c, 4)
    good = requests_for(keys, 1000, "g")
    bad: list[bytes] = []
    for i in range(1000):
        kind = i % 5
        if kind == 0:
            bad.append(os.urandom(20 + i % 50))
        elif kind == 1:
            bad.append(msgpack.packb({"v": 1, "request_id": f"b{i}", "key_id": "k", "scheme": "nope", "payload": b""}))
        elif kind == 2:
            bad.append(
                msgpack.packb({"v": 1, "request_id": f"b{i}", "key_id": True, "scheme": "ed25519", "payload": b""})
            )
        elif kind == 3:
            bad.append(
                msgpack.packb(
                    {"v": 1, "request_id": f"b{i}", "key_id": "k", "scheme": "secp256k1_digest", "payload": b"short"}
                )
            )
        else:
            bad.append(msgpack.packb([1, 2, 3]))
    values: list[tuple[bytes | None, bytes]] = []
    for g, b in zip(good, bad, strict=True):
        values += [(g["key_id"].encode(), msgpack.packb(g)), (b"junk", b)]
    async with ResultReader(c.bootstrap, c.layout.results) as results, \
               ResultReader(c.bootstrap, c.layout.dlq, field="offset") as dlq:  # fmt: skip
        await produce(c.bootstrap, c.layout.requests, values)
        await results.wait_for({g["request_id"] for g in good})
        async with asyncio.timeout(60):
            while dlq.count < 1000:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await dlq.settle()
        check_signed(good, keys, results.by_id)
        records = [r for rs in dlq.by_id.values() for r in rs]
        assert len(records) == 1000
        assert {r["original"] for r in records} == set(bad)
        assert {r["reason"] for r in records} == {
            "malformed",
            "unknown_scheme",
            "wrong_type",
            "invalid_payload",
            "not_a_map",
        }


async def test_sigterm_drains_and_nothing_is_redelivered(cluster: Topology) -> None:
    c = cluster
    first = await c.start_host("first", settings={"SIGNER_SHUTDOWN_TIMEOUT_S": "150"})
    keys = await create_keys(c, 6)
    reqs = requests_for(keys, 4000, "s")
    async with ResultReader(c.bootstrap, c.layout.results) as reader:
        await produce(c.bootstrap, c.layout.requests, [(r["key_id"].encode(), msgpack.packb(r)) for r in reqs])
        async with asyncio.timeout(60):
            while reader.count < 500:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert first.process.stop(signal.SIGTERM, timeout=180) == 0  # drained, committed, left the group
        assert "shutdown_timeout" not in (c.data_dir / "first.log").read_text()
        done_by_first = set(reader.by_id)
        await c.start_host("second")
        await reader.wait_for({r["request_id"] for r in reqs})
        await reader.settle()
        dupes = [k for k, v in reader.by_id.items() if len(v) > 1]
        assert not dupes, f"{len(dupes)} results were redone after a graceful shutdown"
        assert 500 <= len(done_by_first) < len(reqs)
        check_signed(reqs, keys, reader.by_id)
    committed, ends = await committed_and_end_offsets(c.bootstrap, first.config.group_id, first.config.layout)
    c.hosts["second"].process.stop(signal.SIGTERM)
    assert all(committed[tp] == end for tp, end in ends.items())
