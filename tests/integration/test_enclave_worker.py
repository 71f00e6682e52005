"""The enclave worker process over a real Unix socket: HELLO, batches, refusals, bad frames."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import msgpack
import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devkms.local import DevEnclave
from schemas import frames
from signer.keys import KeyManager
from signer.keystore import DirectoryKeyStore
from signer.operator import AdminSession
from signer.pool import EnclavePool, PoolSettings
from tests.enclaves import dev_enclave, start_devkms, start_enclave


@pytest.fixture
def kms_stack(tmp_path: Path) -> Iterator[DevEnclave]:
    """A dev KMS with a dev enclave configuration and a keyring key bound to it."""
    proc, url = start_devkms(tmp_path / "devkms", tmp_path)
    try:
        yield asyncio.run(dev_enclave(url, tmp_path))
    finally:
        proc.stop()


@pytest.fixture
def enclave(sock_dir: Path, tmp_path: Path, kms_stack: DevEnclave) -> Iterator[str]:
    proc, url = start_enclave(sock_dir, "enc-t", tmp_path, credits=64, env=kms_stack.env)
    try:
        yield url
    finally:
        assert proc.stop() == 0  # a clean exit on SIGTERM, after everything thrown at it


def _req(rid: str, key_id: str, scheme: str, payload: object, **kw: object) -> bytes:
    return msgpack.packb({"v": 1, "request_id": rid, "key_id": key_id, "scheme": scheme, "payload": payload, **kw})


def _operator(pool: EnclavePool, dev: DevEnclave, tmp: Path) -> AdminSession:
    """The dev operator, reaching the enclave through the host's key manager."""
    return cast(AdminSession, dev.admin(KeyManager(pool, DirectoryKeyStore(tmp / "keystore")).handle))


async def test_hello_then_batched_signatures(enclave: str, kms_stack: DevEnclave, tmp_path: Path) -> None:
    pool = EnclavePool([enclave], PoolSettings(connections_per_enclave=1))
    await pool.start(ready_timeout=10)
    try:
        conn = pool.connections[0]
        assert conn.enclave_id == "enc-t" and conn.credits == 64
        key = await _operator(pool, kms_stack, tmp_path).create_key("secp256k1", "kr")
        digests = [os.urandom(32) for _ in range(200)]
        batch = pool.submit_many(
            [(key["key_id"], _req(f"r{i}", key["key_id"], "secp256k1_digest", d)) for i, d in enumerate(digests)]
        )
        results = await batch
        assert [r["request_id"] for r in results] == [f"r{i}" for i in range(200)]
        for d, res in zip(digests, results, strict=True):
            sig = res["signature"]
            vrs = (sig[64] + 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
            assert Account._recover_hash(d, vrs=vrs) == key["address"]
            assert res["enclave_id"] == "enc-t" and "enclave_service" in res["timings_us"]
        assert conn.credits == 64  # every credit came back with its results
        assert conn.stats.frames_out < 200 / 10  # batched: never more than 64 (credits) per frame, usually 64
    finally:
        await pool.close()


async def test_refusals_are_results_with_codes(enclave: str, kms_stack: DevEnclave, tmp_path: Path) -> None:
    pool = EnclavePool([enclave], PoolSettings(connections_per_enclave=1))
    await pool.start(ready_timeout=10)
    try:
        ed = await _operator(pool, kms_stack, tmp_path).create_key("ed25519", "kr")
        k = ed["key_id"]
        raws = [
            _req("unknown", "k_nope", "secp256k1_digest", b"\1" * 32),
            _req("mismatch", k, "secp256k1_digest", b"\1" * 32),
            _req("expired", k, "ed25519", b"m", deadline_ms=1),
            _req("invalid", k, "ed25519", 7),
            b"\xc1 not msgpack",
        ]
        res = await pool.submit_many([(k, r) for r in raws])
        got = [(r["status"], r["error"]["code"]) for r in res]
        assert got == [
            ("error", "unknown_key"),
            ("rejected", "scheme_mismatch"),
            ("expired", "deadline_passed"),
            ("error", "wrong_type"),
            ("error", "malformed"),
        ]
        bad = await pool.key_op("keys.create", {"scheme": "rsa", "keyring": "kr"})  # not operator-signed
        assert bad["ok"] is False and bad["error"]["code"] == "operation_unsigned"
    finally:
        await pool.close()


def _connect(url: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(url.removeprefix("unix://"))
    return s


def _read_frame(s: socket.socket) -> dict[str, object] | None:
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = struct.unpack(">I", head)
    body = b""
    while len(body) < size:
        chunk = s.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return frames.decode_body(body)


def _drain_until_closed(s: socket.socket) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _read_frame(s) is None:
            return
    raise AssertionError("the enclave did not close the connection")


def _still_serving(url: str) -> None:
    with _connect(url) as s:
        assert _read_frame(s)["t"] == frames.HELLO  # type: ignore[index]
        s.sendall(frames.encode_frame({"t": frames.PING, "id": 9}))
        pong = _read_frame(s)
        assert pong is not None and (pong["t"], pong["id"]) == (frames.PONG, 9)


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", 0xFFFFFFF0),  # announces an oversized frame
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
        frames.encode_frame({"t": "launch_missiles"}),  # unknown frame type
        frames.encode_frame({"t": frames.SIGN, "items": "nope"}),
        frames.encode_frame({"t": frames.SIGN, "items": [[1, {"not": "bytes"}]]}),
        frames.encode_frame({"no_type": 1}),
    ],
)
def test_bad_frame_closes_only_that_connection(enclave: str, garbage: bytes) -> None:
    with _connect(enclave) as bystander, _connect(enclave) as attacker:
        assert _read_frame(bystander)["t"] == frames.HELLO  # type: ignore[index]
        assert _read_frame(attacker)["t"] == frames.HELLO  # type: ignore[index]
        attacker.sendall(garbage)
        _drain_until_closed(attacker)  # an ERROR frame may come first, then EOF
        bystander.sendall(frames.encode_frame({"t": frames.PING, "id": 1}))
        pong = _read_frame(bystander)
        assert pong is not None and (pong["t"], pong["id"]) == (frames.PONG, 1)


_valid = [
    frames.encode_frame({"t": frames.PING, "id": 1}),
    frames.encode_frame({"t": frames.SIGN, "items": [[1, _req("f", "k", "secp256k1_digest", b"\0" * 32)]]}),
    frames.encode_frame({"t": frames.KEY_OP, "id": 2, "op": "keys.list", "args": {"nonce": b"n" * 16}}),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.tuples(st.sampled_from(_valid), st.integers(0, 200), st.binary(min_size=1, max_size=4)).map(
            lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]  # overwrite bytes of a valid frame
        ),
        st.tuples(st.sampled_from(_valid), st.integers(1, 60)).map(lambda t: t[0][: -t[1]]),  # truncated
    )
)
def test_fuzzed_frames_never_take_down_the_enclave(enclave: str, blob: bytes) -> None:
    with _connect(enclave) as s:
        assert _read_frame(s)["t"] == frames.HELLO  # type: ignore[index]
        s.sendall(blob)
        s.shutdown(socket.SHUT_WR)  # end of input: the enclave answers what it can, then closes
        while _read_frame(s) is not None:
            pass
    _still_serving(enclave)
