"""Poison requests: one request that crashes or hangs the enclave it is sent to.

The host must not re-dispatch it forever (it would rotate across every enclave
and stall the cluster), and the ordinary requests that happened to travel with
it must not be refused with it. Rule under test (signer/pool.py): a lost
connection counts one attempt for each request the enclave had been sent on it;
such a suspect is re-sent only alone on its enclave; at SIGNER_POISON_ATTEMPTS
attempts it is answered `error` / `poison_request` (and, through the host,
recorded in the DLQ with its original bytes).

Enclaves are ScriptedEnclaves (real Unix-socket servers speaking the frame
protocol) that crash - close every connection - or hang a connection whenever a
frame carries the poison request; every other request is answered as the real
noop handler does (sha256 of the request bytes), so results are checkable.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from broker.topics import TopicLayout
from schemas import frames
from schemas.dlq import DlqRecord
from schemas.refusals import Code
from signer.channel import ChannelSettings
from signer.config import ConfigError, HostConfig
from signer.metrics import HostMetrics
from signer.pool import EnclavePool, PoolSettings
from tests.conftest import committed_and_end_offsets, topology
from tests.enclaves import ScriptedEnclave, wait_until

POISON = "r-poison"


def _request(rid: str, key_id: str = "k") -> bytes:
    payload = hashlib.sha256(rid.encode()).digest()
    return msgpack.packb(
        {"v": 1, "request_id": rid, "key_id": key_id, "scheme": "secp256k1_digest", "payload": payload}
    )


def _rid(raw: bytes) -> str:
    return str(msgpack.unpackb(raw, raw=False)["request_id"])


class Poisoned:
    """Enclave behaviour: answer every sign frame, except that a frame carrying the poison request
    crashes the enclave (``crash``: every connection of it closes, nothing in flight is answered) or
    hangs the connection it came on (``hang``: no answer and no pong any more on it)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sign_frames: list[list[str]] = []  # request ids per sign frame, every enclave, arrival order
        self.release = asyncio.Event()  # ends the hangs at teardown

    async def __call__(self, enclave: ScriptedEnclave, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if body["t"] != frames.SIGN:
            return
        items = body["items"]
        ids = [_rid(raw) for _, raw in items]
        self.sign_frames.append(ids)
        if POISON in ids:
            if self.mode == "crash":
                for w in enclave.writers:
                    w.close()
            else:
                await self.release.wait()
            return
        if not writer.is_closing():  # a frame that arrived while the enclave was crashing stays unanswered
            await enclave.answer(items, writer)

    def frames_with(self, rid: str) -> list[list[str]]:
        return [f for f in self.sign_frames if rid in f]

    def resent_alone(self, rid: str) -> bool:
        """After the first frame that carried it, it was only ever sent alone."""
        return all(f == [rid] for f in self.frames_with(rid)[1:])


def _sent_count(enclaves: list[ScriptedEnclave]) -> Counter[str]:
    return Counter(_rid(raw) for e in enclaves for _, raw in e.received)


def _settings(poison_attempts: int = 3, connections: int = 2, **channel: Any) -> PoolSettings:
    base = {"heartbeat_interval_s": 0.05, "dead_after_s": 1.0, "hello_timeout_s": 2.0}
    base.update(channel)
    return PoolSettings(connections_per_enclave=connections, backoff_min_s=0.01, backoff_max_s=0.1,
                        poison_attempts=poison_attempts, channel=ChannelSettings(**base))  # fmt: skip


def _check_results(ids: list[str], raws: list[bytes], results: list[dict[str, Any]]) -> None:
    for rid, raw, res in zip(ids, raws, results, strict=True):
        assert res["request_id"] == rid, res
        if rid == POISON:
            assert res["status"] == "error" and res["error"]["code"] == Code.POISON_REQUEST, res
            assert "not sent to an enclave again" in res["error"]["message"]
        else:
            assert res["status"] == "ok" and res["signature"] == hashlib.sha256(raw).digest(), res


@pytest.mark.parametrize("attempts", [2, 3, 5])
async def test_a_crashing_request_is_refused_after_exactly_n_attempts_and_its_companions_are_signed(
    sock_dir: Path, attempts: int
) -> None:
    script = Poisoned("crash")
    async with ScriptedEnclave(sock_dir / "e0.sock", credits=1000, on_frame=script) as e0, \
               ScriptedEnclave(sock_dir / "e1.sock", credits=1000, on_frame=script) as e1:  # fmt: skip
        metrics = HostMetrics()
        pool = EnclavePool([e0.url, e1.url], _settings(attempts), metrics)
        try:
            await pool.start(ready_timeout=10)
            await wait_until(lambda: len(pool.live()) == 4, what="four live connections")
            ids = [f"r{i}" for i in range(200)]
            ids[57] = POISON
            raws = [_request(rid) for rid in ids]
            async with asyncio.timeout(30):
                results = await pool.submit_many([("k", raw) for raw in raws])  # one keyring: one enclave
            _check_results(ids, raws, results)

            sent = _sent_count([e0, e1])
            assert sent[POISON] == attempts  # in flight on exactly N lost connections, then never again
            first, *again = script.frames_with(POISON)
            assert len(first) > 50  # it first crashed an enclave together with many ordinary requests ...
            assert all(f == [POISON] for f in again)  # ... and was re-sent alone after that
            assert all(sent[rid] <= 2 for rid in ids if rid != POISON)  # lost once at most, then answered
            assert all(sent[rid] == 2 for rid in first if rid != POISON)
            assert all(script.resent_alone(rid) for rid in ids)  # once a suspect, never in a shared frame again
            assert metrics.poison_requests.labels("closed")._value.get() == 1
            assert not pool.suspects and not pool._isolating  # all settled, every enclave back to ordinary work
        finally:
            await pool.close()


async def test_a_hanging_request_counts_heartbeat_timeouts_as_lost_connections(sock_dir: Path) -> None:
    script = Poisoned("hang")
    async with ScriptedEnclave(sock_dir / "e0.sock", credits=1000, on_frame=script) as e0, \
               ScriptedEnclave(sock_dir / "e1.sock", credits=1000, on_frame=script) as e1:  # fmt: skip
        metrics = HostMetrics()
        pool = EnclavePool([e0.url, e1.url], _settings(connections=1, dead_after_s=0.3), metrics)
        try:
            await pool.start(ready_timeout=10)
            await wait_until(lambda: len(pool.live()) == 2, what="both enclaves")
            ids = [f"h{i}" for i in range(60)]
            ids[13] = POISON
            raws = [_request(rid) for rid in ids]
            async with asyncio.timeout(30):
                results = await pool.submit_many([("k", raw) for raw in raws])
            _check_results(ids, raws, results)
            assert _sent_count([e0, e1])[POISON] == 3  # the default limit
            first, *again = script.frames_with(POISON)
            assert len(first) > 1 and again == [[POISON], [POISON]]
            assert metrics.poison_requests.labels("hung")._value.get() == 1
            assert metrics.poison_requests.labels("closed")._value.get() == 0
        finally:
            script.release.set()
            await pool.close()


async def test_only_requests_the_enclave_was_sent_count_and_one_enclave_still_isolates(sock_dir: Path) -> None:
    # one enclave granting 10 credits: the poison is among the 10 in flight, 90 more wait on the host
    script = Poisoned("crash")
    async with ScriptedEnclave(sock_dir / "e0.sock", credits=10, on_frame=script) as e0:
        metrics = HostMetrics()
        pool = EnclavePool([e0.url], _settings(connections=1), metrics)
        try:
            await pool.start(ready_timeout=10)
            ids = [f"q{i}" for i in range(100)]
            ids[4] = POISON
            raws = [_request(rid) for rid in ids]
            async with asyncio.timeout(30):
                results = await pool.submit_many([("k", raw) for raw in raws])
            _check_results(ids, raws, results)
            sent = _sent_count([e0])
            first = script.frames_with(POISON)[0]
            assert len(first) == 10 and sent[POISON] == 3
            assert all(sent[rid] == 2 for rid in first if rid != POISON)  # in flight when it crashed: once more
            assert all(sent[rid] == 1 for rid in ids if rid not in first)  # never sent before: no attempt, no rerun
            assert all(script.resent_alone(rid) for rid in first)
            # while the suspects were tried alone, the ordinary requests waited: nothing else was in flight
            suspect_frames = [i for i, f in enumerate(script.sign_frames) if len(f) == 1 and f[0] in first]
            assert suspect_frames == list(range(1, 1 + 9 + 2))  # 9 companions once, the poison twice, in a row
            assert metrics.poison_requests.labels("closed")._value.get() == 1
        finally:
            await pool.close()


def test_the_attempt_limit_is_a_host_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIGNER_POISON_ATTEMPTS", raising=False)
    monkeypatch.delenv("SIGNER_CONFIG_FILE", raising=False)
    assert HostConfig.from_env().pool.poison_attempts == 3
    monkeypatch.setenv("SIGNER_POISON_ATTEMPTS", "5")
    assert HostConfig.from_env().pool.poison_attempts == 5
    monkeypatch.setenv("SIGNER_POISON_ATTEMPTS", "1")  # 1 would refuse whatever shared a connection with it
    with pytest.raises(ConfigError, match="SIGNER_POISON_ATTEMPTS"):
        HostConfig.from_env()


async def test_a_record_with_two_outputs_is_done_only_when_both_are_acknowledged() -> None:
    from typing import cast

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from signer.commits import Commits, RecordBatches
    from signer.intake import Output
    from signer.metrics import HostMetrics

    class Writer:  # one batch per topic, acknowledged when the test says so
        def __init__(self) -> None:
            self.acks: list[asyncio.Future[None]] = []

        async def write(self, outputs: list[Output]) -> None:
            topics = {o.topic for o in outputs}
            new = [asyncio.get_running_loop().create_future() for _ in topics]
            self.acks += new
            await asyncio.gather(*new)

    commits = Commits(cast(AIOKafkaConsumer, None), HostMetrics(), interval_s=1)
    tp = TopicPartition("sign.requests", 0)
    commits.tracker.add(tp, [7])
    writer = Writer()
    outputs = [Output("sign.results", b"r", b"result", tp, 7), Output("sign.dlq", b"r", b"dlq record", tp, 7)]
    publishing = asyncio.create_task(commits.publish(cast(RecordBatches, writer), outputs))
    while len(writer.acks) < 2:  # noqa: ASYNC110 - until both outputs are handed over
        await asyncio.sleep(0)
    writer.acks[0].set_result(None)  # one of the two batches
    await asyncio.sleep(0)
    assert commits.tracker.committable() == {} and commits.in_flight == 1  # the other is not in yet
    writer.acks[1].set_result(None)
    await publishing
    assert commits.tracker.committable() == {tp: 8} and commits.in_flight == 0


# -- through the real host worker and the real broker ------------------------------------------------------


class TopicReader:
    """Reads a topic from the beginning in the background."""

    def __init__(self, bootstrap: str, topic: str, read_committed: bool) -> None:
        self.records: list[dict[str, Any]] = []
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                         enable_auto_commit=False,
                                         isolation_level="read_committed" if read_committed else "read_uncommitted")  # fmt: skip
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TopicReader:
        await self.consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            for recs in (await self.consumer.getmany(timeout_ms=200)).values():
                self.records += [msgpack.unpackb(r.value, raw=False) for r in recs]

    def by(self, field: str) -> dict[Any, list[dict[str, Any]]]:
        out: dict[Any, list[dict[str, Any]]] = {}
        for r in self.records:
            out.setdefault(r.get(field), []).append(r)
        return out

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()


async def _metrics_text(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


def _sample(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
async def scripted_pair(sock_dir: Path) -> AsyncIterator[tuple[Poisoned, list[ScriptedEnclave]]]:
    script = Poisoned("crash")
    async with ScriptedEnclave(sock_dir / "e0.sock", credits=1000, on_frame=script) as e0, \
               ScriptedEnclave(sock_dir / "e1.sock", credits=1000, on_frame=script) as e1:  # fmt: skip
        yield script, [e0, e1]


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
async def test_through_the_host_the_poison_request_gets_a_result_and_a_dlq_record_and_offsets_commit(
    bootstrap: str, layout: TopicLayout, tmp_path: Path,
    scripted_pair: tuple[Poisoned, list[ScriptedEnclave]], exactly_once: bool,
) -> None:  # fmt: skip
    script, enclaves = scripted_pair
    topo = topology(tmp_path, tmp_path, bootstrap, layout, log_level="INFO")
    settings = {
        "SIGNER_SESSION_TIMEOUT_MS": "6000",
        "SIGNER_TRANSACTION_TIMEOUT_MS": "8000",
        "SIGNER_HEARTBEAT_INTERVAL_MS": "100",
        "SIGNER_EXACTLY_ONCE": "true" if exactly_once else "false",
    }
    try:
        # the scripted enclaves live on this event loop: waiting for the host's READY line does not block it
        started = await topo.start_host(settings=settings, enclaves=[e.url for e in enclaves], timeout=90)
        host, port = started.process, started.port
        ids = [f"k{i}" for i in range(400)]
        ids[123] = POISON
        raws = {rid: _request(rid, key_id=f"key-{i % 7}") for i, rid in enumerate(ids)}
        async with TopicReader(bootstrap, layout.results, exactly_once) as results, \
                   TopicReader(bootstrap, layout.dlq, exactly_once) as dlq:  # fmt: skip
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
            await producer.start()
            try:
                for i, rid in enumerate(ids):
                    await producer.send(layout.requests, raws[rid], key=f"key-{i % 7}".encode())
                await producer.flush()
            finally:
                await producer.stop()
            await wait_until(lambda: set(ids) <= set(results.by("request_id")) and dlq.records, timeout=90,
                             what="a result for every request and the DLQ record")  # fmt: skip
            # the host commits what is done within its commit interval (or its transaction): wait for it
            group = started.config.group_id
            async with asyncio.timeout(30):
                while True:
                    committed, ends = await committed_and_end_offsets(bootstrap, group, layout)
                    if committed == ends:
                        break
                    await asyncio.sleep(0.1)
            assert sum(ends.values()) == len(ids)
            text = await _metrics_text(port)

            by_id = results.by("request_id")
            for rid in ids:
                got = by_id[rid]
                if rid == POISON:
                    assert {(r["status"], r["error"]["code"]) for r in got} == {("error", Code.POISON_REQUEST)}, got
                    continue
                assert {(r["status"], r["signature"]) for r in got} == {("ok", hashlib.sha256(raws[rid]).digest())}
            records = [DlqRecord.decode(msgpack.packb(r)) for r in dlq.records]
            assert len({(r.reason, r.original, r.request_id) for r in records}) == 1
            rec = records[0]
            assert (rec.reason, rec.original, rec.request_id, rec.topic) == (
                Code.POISON_REQUEST, raws[POISON], POISON, layout.requests,
            )  # fmt: skip
            assert rec.original_key is not None and "not sent to an enclave again" in rec.message

        sent = _sent_count(enclaves)
        assert sent[POISON] == 3
        assert len(script.frames_with(POISON)[0]) > 1  # it did travel with ordinary requests
        assert _sample(text, 'signer_poison_requests_total{reason="closed"}') == 1
        assert _sample(text, 'signer_dlq_records_total{reason="poison_request"}') == 1
        assert _sample(text, 'signer_requests_total{scheme="secp256k1_digest",status="ok"}') >= len(ids) - 1
        assert await host.astop(signal.SIGTERM, 60) == 0
    finally:
        await topo.aclose(kill=True)
