"""Persistent multiplexed channels: batching, credits, failures, reconnects, link shaping.

Real enclave worker processes on Unix sockets (the `noop` handler answers with
sha256(request) instead of a signature, so exactly-once delivery and determinism
can be checked without keys), and a scripted enclave peer behind the same
transport seam where a behaviour must be provoked precisely.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from pathlib import Path

import msgpack
import pytest

from schemas import frames
from signer.channel import Batch, ChannelClosed, ChannelSettings, EnclaveConnection
from signer.metrics import HostMetrics
from signer.pool import EnclavePool, PoolSettings
from tests.enclaves import ScriptedEnclave, start_enclave, wait_until


def _raw(i: int) -> bytes:
    return msgpack.packb({"v": 1, "request_id": f"r{i}", "key_id": f"k{i % 97}", "scheme": "ed25519", "payload": b"x"})


def _settings(**channel: object) -> PoolSettings:
    base = {"heartbeat_interval_s": 0.1, "dead_after_s": 1.0, "hello_timeout_s": 2.0}
    base.update(channel)
    return PoolSettings(
        connections_per_enclave=2, backoff_min_s=0.02, backoff_max_s=0.2, channel=ChannelSettings(**base)
    )  # type: ignore[arg-type]


async def _all_answered_once(batch: Batch, raws: list[bytes], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        results = await batch
    assert len(results) == len(raws)
    for i, (raw, res) in enumerate(zip(raws, results, strict=True)):
        assert res["request_id"] == f"r{i}" and res["signature"] == hashlib.sha256(raw).digest(), res


async def test_requests_travel_in_batches_under_load(sock_dir: Path, tmp_path: Path) -> None:
    proc, url = start_enclave(sock_dir, "e0", tmp_path, handler="noop")
    pool = EnclavePool([url], _settings(max_batch=256))
    try:
        await pool.start(ready_timeout=10)
        await wait_until(lambda: len(pool.live()) == 2, what="both connections")
        raws = [_raw(i) for i in range(10_000)]
        await _all_answered_once(pool.submit_many([(f"k{i % 97}", r) for i, r in enumerate(raws)]), raws)
        frames_out = sum(c.stats.frames_out for c in pool.connections)
        assert sum(c.stats.requests_out for c in pool.connections) == 10_000
        assert frames_out <= 10_000 / 50, f"{frames_out} frames for 10000 requests"
        assert all(c.stats.requests_out > 0 for c in pool.connections)  # both connections used
    finally:
        await pool.close()
        proc.stop()


async def test_a_frame_respects_the_byte_bound(sock_dir: Path, tmp_path: Path) -> None:
    proc, url = start_enclave(sock_dir, "e0", tmp_path, handler="noop")
    pool = EnclavePool([url], PoolSettings(connections_per_enclave=1, channel=ChannelSettings(max_batch_bytes=4096)))
    try:
        await pool.start(ready_timeout=10)
        raws = [_raw(i) for i in range(2000)]
        await _all_answered_once(pool.submit_many([(f"k{i % 97}", r) for i, r in enumerate(raws)]), raws)
        per_frame = 4096 // len(raws[0]) + 1
        assert pool.connections[0].stats.frames_out >= 2000 / per_frame
    finally:
        await pool.close()
        proc.stop()


async def test_no_credit_means_nothing_more_is_sent(sock_dir: Path) -> None:
    async with ScriptedEnclave(sock_dir / "s.sock", credits=5) as enclave:
        pool = EnclavePool([enclave.url], PoolSettings(connections_per_enclave=1))
        try:
            await pool.start(ready_timeout=10)
            raws = [_raw(i) for i in range(50)]
            batch = pool.submit_many([("k", r) for r in raws])
            await enclave.wait_received(5)
            conn = pool.connections[0]
            # the host holds the rest: 5 in flight (all its credit), 45 queued, saturated
            assert (len(conn.inflight), len(conn.queue), conn.credits, pool.saturated) == (5, 45, 0, True)
            assert len(enclave.received) == 5
            # answering three and returning three credits lets exactly three more through
            done = enclave.received[:3]
            await enclave.send(
                {"t": frames.RESULTS, "credits": 3, "items": [[c, {"request_id": "x", "n": c}] for c, _ in done]}
            )
            await enclave.wait_received(8)
            await asyncio.sleep(0)  # let the host observe its own state
            assert (len(conn.inflight), len(conn.queue), conn.credits) == (5, 42, 0)
            assert len(enclave.received) == 8
            assert batch.answered == 3
        finally:
            await pool.close()


async def test_killing_an_enclave_mid_load_loses_no_request(sock_dir: Path, tmp_path: Path) -> None:
    p0, u0 = start_enclave(sock_dir, "e0", tmp_path, handler="noop", credits=256)
    p1, u1 = start_enclave(sock_dir, "e1", tmp_path, handler="noop", credits=256)
    metrics = HostMetrics()
    pool = EnclavePool([u0, u1], _settings(max_batch=64), metrics)
    try:
        await pool.start(ready_timeout=10)
        await wait_until(lambda: len(pool.live()) == 4, what="four live connections")
        raws = [_raw(i) for i in range(30_000)]
        batch = pool.submit_many([(f"k{i % 97}", r) for i, r in enumerate(raws)])
        # kill e0 while it has work in flight
        await wait_until(
            lambda: any(c.inflight for c in pool.live(u0)) and batch.answered >= 2000,
            what="e0 busy mid-load",
        )
        p0.stop(signal.SIGKILL)
        await _all_answered_once(batch, raws)
        assert metrics.redispatched._value.get() > 0  # some requests really were re-dispatched
        assert not pool.live(u0) and len(pool.live(u1)) == 2
    finally:
        await pool.close()
        p1.stop()


async def test_reconnects_after_the_enclave_restarts(sock_dir: Path, tmp_path: Path) -> None:
    proc, url = start_enclave(sock_dir, "e0", tmp_path, handler="noop")
    metrics = HostMetrics()
    pool = EnclavePool([url], _settings(), metrics)
    try:
        await pool.start(ready_timeout=10)
        raws = [_raw(i) for i in range(100)]
        await _all_answered_once(pool.submit_many([("k", r) for r in raws]), raws)
        proc.stop(signal.SIGKILL)
        await wait_until(lambda: not pool.live(), what="the connections to notice the kill")
        # accepted while no enclave is up: held, not failed
        batch = pool.submit_many([("k", r) for r in raws])
        proc, _ = start_enclave(sock_dir, "e0", tmp_path, handler="noop")
        await _all_answered_once(batch, raws, timeout=30)
        assert metrics.reconnects._value.get() >= 1
    finally:
        await pool.close()
        proc.stop()


async def test_a_hung_enclave_is_detected_and_its_work_moves(sock_dir: Path, tmp_path: Path) -> None:
    p0, u0 = start_enclave(sock_dir, "e0", tmp_path, handler="noop")
    p1, u1 = start_enclave(sock_dir, "e1", tmp_path, handler="noop")
    pool = EnclavePool([u0, u1], _settings(dead_after_s=0.5, heartbeat_interval_s=0.1))
    try:
        await pool.start(ready_timeout=10)
        await wait_until(lambda: len(pool.live()) == 4, what="four live connections")
        p0.popen.send_signal(signal.SIGSTOP)  # hung, not dead: the socket stays open
        t0 = time.monotonic()
        raws = [_raw(i) for i in range(2000)]
        await _all_answered_once(pool.submit_many([(f"k{i % 97}", r) for i, r in enumerate(raws)]), raws, timeout=20)
        assert not pool.live(u0)
        assert time.monotonic() - t0 < 5  # detected within the configured time, not a TCP timeout
    finally:
        p0.popen.send_signal(signal.SIGCONT)
        await pool.close()
        p0.stop()
        p1.stop()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x03\xc1\xc1\xc1",  # a body that is not msgpack
        b"\xff\xff\xff\xf0",  # announces an oversized frame
        frames.encode_frame({"t": "surprise"}),  # unknown frame type
        frames.encode_frame({"t": frames.RESULTS, "items": "nope", "credits": 1}),
        frames.encode_frame({"t": frames.RESULTS, "items": [[1, "not a map"]], "credits": 1}),
        frames.encode_frame({"t": frames.RESULTS, "items": [], "credits": -5}),
        frames.encode_frame({"t": frames.ERROR, "code": "boom", "message": "enclave gave up"}),
    ],
)
async def test_a_corrupt_frame_from_the_enclave_drops_only_that_connection(sock_dir: Path, garbage: bytes) -> None:
    state = {"corrupted": False}

    async def corrupt_first_sign(
        enclave: ScriptedEnclave, body: dict[str, object], writer: asyncio.StreamWriter
    ) -> None:
        if body["t"] != frames.SIGN:
            return
        if not state["corrupted"]:
            state["corrupted"] = True
            writer.write(garbage)
            return
        items = body["items"]
        await enclave.answer(items, writer)

    async with ScriptedEnclave(sock_dir / "s.sock", credits=100, on_frame=corrupt_first_sign) as enclave:
        metrics = HostMetrics()
        pool = EnclavePool([enclave.url], _settings(), metrics)
        try:
            await pool.start(ready_timeout=10)
            raws = [_raw(i) for i in range(20)]
            await _all_answered_once(pool.submit_many([("k", r) for r in raws]), raws, timeout=20)
            assert state["corrupted"] and metrics.reconnects._value.get() >= 1
        finally:
            await pool.close()


async def test_link_shaping_adds_the_configured_delay(sock_dir: Path, tmp_path: Path) -> None:
    proc, url = start_enclave(sock_dir, "e0", tmp_path, handler="noop")

    async def min_rtt(channel_url: str) -> float:
        pool = EnclavePool(
            [channel_url], PoolSettings(connections_per_enclave=1, channel=ChannelSettings(batch_window_s=0))
        )
        await pool.start(ready_timeout=10)
        try:
            best = 1e9
            for i in range(5):
                t0 = time.perf_counter()
                await pool.sign("k", _raw(i))
                best = min(best, time.perf_counter() - t0)
            return best
        finally:
            await pool.close()

    async def bulk_seconds(channel_url: str, raws: list[bytes]) -> float:
        pool = EnclavePool([channel_url], PoolSettings(connections_per_enclave=1))
        await pool.start(ready_timeout=10)
        try:
            t0 = time.perf_counter()
            await pool.submit_many([("k", r) for r in raws])
            return time.perf_counter() - t0
        finally:
            await pool.close()

    try:
        plain = await min_rtt(url)
        shaped = await min_rtt(url + "?latency_ms=40")
        assert plain < 0.040
        assert shaped >= 0.080  # 40 ms each way
        big = [
            msgpack.packb({"v": 1, "request_id": f"r{i}", "key_id": "k", "scheme": "ed25519", "payload": bytes(1000)})
            for i in range(400)
        ]
        # ~400 KB at 8 Mbit/s (1 MB/s) cannot take less than ~0.4 s
        assert await bulk_seconds(url + "?bandwidth_mbps=8", big) >= 0.38
    finally:
        proc.stop()


async def test_a_saturated_enclave_spills_to_the_least_loaded(sock_dir: Path) -> None:
    # e0 grants 4 credits, answers the first 4 requests (so the keyring is warm there) and then never again;
    # e1 answers everything: once far more than SIGNER_SPILL_AFTER requests wait on e0, the keyring's work
    # spills to e1 (which unwraps it once). Work queued before that waits for e0.
    async def answer(enclave: ScriptedEnclave, body: dict[str, object], writer: asyncio.StreamWriter) -> None:
        if body["t"] == frames.SIGN:
            await enclave.answer(body["items"], writer)

    async def first_four(enclave: ScriptedEnclave, body: dict[str, object], writer: asyncio.StreamWriter) -> None:
        if body["t"] == frames.SIGN and len(enclave.received) <= 4:
            await enclave.answer(body["items"], writer)

    async with ScriptedEnclave(sock_dir / "stuck.sock", credits=4, on_frame=first_four) as stuck, \
               ScriptedEnclave(sock_dir / "ok.sock", credits=1000, on_frame=answer) as ok:  # fmt: skip
        metrics = HostMetrics()
        settings = PoolSettings(connections_per_enclave=1, spill_after=10, cold_spill_factor=4)
        pool = EnclavePool([stuck.url, ok.url], settings, metrics)
        try:
            await pool.start(ready_timeout=10)
            await wait_until(lambda: len(pool.live()) == 2, what="both enclaves")
            key = next(f"k{i}" for i in range(1000) if pool.affinity(f"k{i}") == stuck.url)
            warm = await pool.submit_many([(key, _raw(i)) for i in range(4)])  # e0 answers these: warm there
            assert len(warm) == 4 and len(ok.received) == 0
            batch = pool.submit_many([(key, _raw(i)) for i in range(4, 204)])
            # e0 keeps 40 (4 x spill_after) before the rest spills; it never answers them
            await wait_until(lambda: batch.answered >= 200 - 40, what="spilled requests answered")
            assert metrics.spilled._value.get() >= 150
            assert len(stuck.received) == 8  # it never got more than its credits
        finally:
            await pool.close()


async def test_one_hot_keyring_is_signed_by_more_than_one_enclave(sock_dir: Path) -> None:
    # both enclaves answer and have credits to spare: once the keyring is warm in its enclave and far more
    # than SIGNER_SPILL_AFTER requests are outstanding there, its requests go to the other one too (a spill
    # rule on queueing beyond credits never fired here: 2 x 4,096 credits, so one hot wallet was capped at
    # one enclave core)
    async def answer(enclave: ScriptedEnclave, body: dict[str, object], writer: asyncio.StreamWriter) -> None:
        if body["t"] == frames.SIGN:
            await enclave.answer(body["items"], writer)

    async with ScriptedEnclave(sock_dir / "a.sock", credits=4096, on_frame=answer) as a, \
               ScriptedEnclave(sock_dir / "b.sock", credits=4096, on_frame=answer) as b:  # fmt: skip
        metrics = HostMetrics()
        pool = EnclavePool([a.url, b.url], PoolSettings(connections_per_enclave=2), metrics)
        try:
            await pool.start(ready_timeout=10)
            await wait_until(lambda: len(pool.live()) == 4, what="every connection")
            # cold: the keyring's enclave alone (its data key is unwrapped by one enclave first)
            await pool.submit_many([("hot-keyring", _raw(i)) for i in range(2000)])
            assert sorted([len(a.received), len(b.received)]) == [0, 2000]
            # warm there, and a backlog far past SIGNER_SPILL_AFTER: the other enclave takes a share
            results = await pool.submit_many([("hot-keyring", _raw(i)) for i in range(2000, 4000)])
            assert len(results) == 2000
            counts = sorted([len(a.received), len(b.received)])
            assert sum(counts) == 4000 and counts[0] >= 500, counts
            assert metrics.spilled._value.get() == counts[0]
        finally:
            await pool.close()


async def test_a_pool_that_fails_fails_its_watcher_instead_of_leaving_the_host_waiting(sock_dir: Path) -> None:
    # a bug in the pool's own bookkeeping (here: bringing a connection up raises) ends the task that keeps
    # every connection alive; the host's watcher must raise rather than let requests wait forever
    async with ScriptedEnclave(sock_dir / "e.sock", credits=10) as enclave:
        pool = EnclavePool([enclave.url], PoolSettings(connections_per_enclave=1), HostMetrics())

        def broken() -> None:
            raise ValueError("a bug in the pool")

        pool._on_up = broken  # type: ignore[method-assign]
        await pool.start()
        try:
            with pytest.raises(RuntimeError, match="enclave pool stopped"):
                async with asyncio.timeout(10):
                    await pool.watch()
        finally:
            await pool.close()


def test_a_write_to_a_connection_that_closed_meanwhile_is_a_lost_connection_under_uvloop(sock_dir: Path) -> None:
    # with uvloop (what hosts run on) a write to a transport that has closed raises RuntimeError, not a
    # ConnectionError: it must count as a lost connection, not as a bug that fails the whole pool (a soak
    # run lost a host this way when an enclave was SIGKILLed under load)
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with ScriptedEnclave(sock_dir / "e.sock", credits=10) as enclave:
            conn = EnclaveConnection(enclave.url, ChannelSettings(), lambda *a: None, HostMetrics())
            await conn.connect()
            assert conn._writer is not None
            conn._writer.transport.abort()  # the peer reset it, say
            for _ in range(3):
                await asyncio.sleep(0)  # the transport's close runs
            with pytest.raises(ChannelClosed):
                await conn._write(frames.PingFrame(1).encode())
            await conn.close()

    uvloop.run(scenario())


async def test_many_key_operations_at_once_wait_their_turn(sock_dir: Path, tmp_path: Path) -> None:
    """40 key operations at once on one connection (an enclave drops a connection with more than 8 in
    flight): each gets the enclave's reply and the connection stays up. (Without the host's limit the
    enclave dropped it and most of them failed with ChannelClosed.)"""
    proc, url = start_enclave(sock_dir, "e0", tmp_path, handler="noop")
    pool = EnclavePool([url], _settings())
    try:
        await pool.start(ready_timeout=10)
        await wait_until(lambda: len(pool.live()) == 2, what="both connections")
        conn = pool.live()[0]
        connects = conn.stats.connects
        async with asyncio.timeout(30):
            replies = await asyncio.gather(*(conn.key_op("keys.list", {}) for _ in range(40)))
        # the noop enclave has no vault: every operation gets its typed refusal, none is lost
        assert [r["ok"] for r in replies] == [False] * 40
        assert {r["error"]["code"] for r in replies} == {"unsupported"}
        assert conn.connected and conn.stats.connects == connects
        # the pool spreads concurrent operations over an enclave's connections
        async with asyncio.timeout(30):
            await asyncio.gather(*(pool.key_op("keys.list", {}) for _ in range(40)))
        assert all(c.connected for c in pool.connections)
    finally:
        await pool.close()
        proc.stop()
