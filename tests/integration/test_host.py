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
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from eth_account import Account

from broker.topics import TopicLayout
from signer.admin_client import admin_call
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


class OneBatch:
    """Wraps a host's consumer: once armed, what it fetches is held back until it holds both an admin
    record and sign requests, and is then handed to the host as one batch."""

    def __init__(self, consumer: AIOKafkaConsumer, layout: TopicLayout) -> None:
        self.fetch, self.layout = consumer.getmany, layout
        self.armed = False
        self.held: dict[Any, list[Any]] = {}
        self.released: dict[Any, list[Any]] = {}
        consumer.getmany = self._getmany  # type: ignore[method-assign]

    async def _getmany(self, *args: Any, **kw: Any) -> dict[Any, list[Any]]:
        batch = await self.fetch(*args, **kw)
        if not self.armed:
            return batch
        for tp, records in batch.items():
            self.held.setdefault(tp, []).extend(records)
        if {self.layout.admin, self.layout.requests} <= {tp.topic for tp in self.held}:
            self.armed, self.released, self.held = False, self.held, {}
            return self.released
        return {}


async def _group_caught_up(bootstrap: str, group: str, topic: str, partitions: int, timeout: float = 30) -> None:
    """Wait until the group's committed offsets reach the end of every partition of `topic`."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(parts)
        deadline = time.monotonic() + timeout
        while True:
            committed = await admin.list_consumer_group_offsets(group)
            at = {tp: committed[tp].offset if tp in committed else 0 for tp in parts}
            behind = {tp: (at[tp], ends[tp]) for tp in parts if at[tp] < ends[tp]}
            if not behind:
                return
            assert time.monotonic() < deadline, f"committed offsets behind the log end: {behind}"
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()
        await admin.close()


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
async def test_a_slow_admin_operation_does_not_hold_up_sign_requests_fetched_with_it(
    bootstrap: str, layout: TopicLayout, tmp_path: Path, sock_dir: Path, exactly_once: bool
) -> None:
    """keys.create of a new keyring while KMS throttles: the enclave retries GenerateDataKey (up to its
    unwrap timeout, here 60 s). Sign requests for a key whose data key is already open, fetched in the
    same batch as that operation, are answered at once; the operation's reply follows once KMS
    recovers, and only then is its record committed."""
    c = topology(tmp_path, sock_dir, bootstrap, layout, host_settings=HOST_SETTINGS, log_level="INFO")
    try:
        await c.start_kms()
        dev = await c.provision()
        await c.start_enclaves(Enclaves(1, "enc", env={"ENCLAVE_UNWRAP_TIMEOUT_S": "60"}))
        settings = {"SIGNER_EXACTLY_ONCE": "true" if exactly_once else "false",
                    "SIGNER_TRANSACTIONAL_ID": f"tx-{layout.requests}"}  # fmt: skip
        local = await c.start_local_host(c.host_config(settings, http_port=0))
        assert local.worker.consumer is not None
        gate = OneBatch(local.worker.consumer, c.layout)
        key = await c.operator().create_key("secp256k1", "warm")
        reqs = requests_for([key], 51, "slow-admin-")
        warm, reqs = reqs[:1], reqs[1:]
        values: list[tuple[bytes | None, bytes]] = [(r["key_id"].encode(), msgpack.packb(r)) for r in reqs]
        async with ResultReader(c.bootstrap, c.layout.results, read_committed=exactly_once) as reader:
            await produce(c.bootstrap, c.layout.requests, [(warm[0]["key_id"].encode(), msgpack.packb(warm[0]))])
            await reader.wait_for({warm[0]["request_id"]}, timeout=60)  # the key's data key is open in the enclave

            sent_at: list[float] = []

            async def call(op: str, args: dict[str, Any]) -> dict[str, Any]:
                if op == "keys.create":  # the operation and the sign requests reach the host as one batch
                    gate.armed = True
                    await produce(c.bootstrap, c.layout.requests, values)
                    sent_at.append(time.monotonic())
                return await admin_call(c.bootstrap, op, args, c.layout, timeout=150)

            async with aiohttp.ClientSession() as s:
                await s.post(f"{c.kms_url}/_dev/throttle", json={"next": 1_000_000})
            creating = asyncio.create_task(dev.admin(call).create_key("secp256k1", "slow"))
            try:
                async with asyncio.timeout(60):
                    while not sent_at and not creating.done():  # noqa: ASYNC110 - until the batch is on its way
                        await asyncio.sleep(0.02)
                assert not creating.done(), creating.exception()
                await reader.wait_for({r["request_id"] for r in reqs}, timeout=20)
                signed_in = time.monotonic() - sent_at[0]
                assert {tp.topic for tp in gate.released} == {c.layout.admin, c.layout.requests}
                assert not creating.done(), "the operation was expected to wait for KMS"
                async with aiohttp.ClientSession() as s, s.get(f"{c.kms_url}/_dev/stats") as r:
                    assert (await r.json())["throttled"] > 0  # it is waiting: KMS refused its GenerateDataKey
            finally:
                async with aiohttp.ClientSession() as s:
                    await s.post(f"{c.kms_url}/_dev/throttle", json={"next": 0})
            created = await asyncio.wait_for(creating, 150)
            check_signed(reqs, [key], reader.by_id)
        assert created["keyring"] == "slow" and signed_in < 20
        group = local.worker.config.group_id
        await _group_caught_up(c.bootstrap, group, c.layout.admin, 1)  # the admin records, once their replies are in
        await _group_caught_up(c.bootstrap, group, c.layout.requests, c.layout.request_partitions)
    finally:
        await c.aclose(kill=True)
