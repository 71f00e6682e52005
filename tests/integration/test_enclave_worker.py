"""The enclave worker process over a real Unix socket: HELLO, batches, refusals, bad frames."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account

from schemas import frames
from schemas.transport import open_channel
from signer.channel import EnclaveChannel
from tests.procs import Proc


@pytest.fixture
def enclave(sock_dir: Path, tmp_path: Path) -> Iterator[str]:
    url = f"unix://{sock_dir / 'e.sock'}"
    proc = Proc(["enclave_worker", "--listen", url, "--enclave-id", "enc-t", "--credits", "64"],
                log=tmp_path / "enclave.log")  # fmt: skip
    try:
        proc.wait_for_line("READY")
        yield url
    finally:
        assert proc.stop() == 0  # a clean exit on SIGTERM


async def test_hello_then_batched_signatures(enclave: str) -> None:
    ch = EnclaveChannel(enclave)
    await ch.connect()
    try:
        assert ch.enclave_id == "enc-t" and ch.credits.available == 64
        key = (await ch.key_op("keys.create", {"scheme": "secp256k1"}))["result"]
        reqs = [{"v": 1, "request_id": f"r{i}", "key_id": key["key_id"], "scheme": "secp256k1_digest",
                 "payload": os.urandom(32)} for i in range(200)]  # fmt: skip
        results = await ch.sign(reqs, max_batch=50)
        assert [r["request_id"] for r in results] == [r["request_id"] for r in reqs]
        for req, res in zip(reqs, results, strict=True):
            sig = res["signature"]
            vrs = (sig[64] + 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
            assert Account._recover_hash(req["payload"], vrs=vrs) == key["address"]
            assert res["enclave_id"] == "enc-t" and "enclave_service" in res["timings_us"]
        assert ch.credits.available == 64  # every credit came back with its results
    finally:
        await ch.close()


async def test_refusals_are_results_with_codes(enclave: str) -> None:
    ch = EnclaveChannel(enclave)
    await ch.connect()
    try:
        ed = (await ch.key_op("keys.create", {"scheme": "ed25519"}))["result"]
        reqs = [
            {"v": 1, "request_id": "unknown", "key_id": "k_nope", "scheme": "secp256k1_digest", "payload": b"\1" * 32},
            {"v": 1, "request_id": "mismatch", "key_id": ed["key_id"], "scheme": "secp256k1_digest", "payload": b"\1" * 32},
            {"v": 1, "request_id": "expired", "key_id": ed["key_id"], "scheme": "ed25519", "payload": b"m", "deadline_ms": 1},
            {"v": 1, "request_id": "invalid", "key_id": ed["key_id"], "scheme": "ed25519", "payload": 7},
            "not a map",
        ]  # fmt: skip
        res = await ch.sign(reqs, max_batch=10)  # type: ignore[arg-type]
        got = [(r["status"], r["error"]["code"]) for r in res]
        assert got == [("error", "unknown_key"), ("rejected", "scheme_mismatch"), ("expired", "deadline_passed"),
                       ("error", "wrong_type"), ("error", "invalid_request")]  # fmt: skip
        bad = await ch.key_op("keys.create", {"scheme": "rsa"})
        assert bad["ok"] is False and bad["error"]["code"] == "invalid_argument"
    finally:
        await ch.close()


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", 0xFFFFFFF0),  # announces an oversized frame
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # not msgpack
        frames.encode_frame({"t": "launch_missiles"}),  # unknown frame type
        frames.encode_frame({"t": frames.SIGN, "items": "nope"}),
    ],
)
async def test_bad_frame_closes_only_that_connection(enclave: str, garbage: bytes) -> None:
    good = EnclaveChannel(enclave)
    await good.connect()
    reader, writer = await open_channel(enclave)
    try:
        hello = await frames.read_frame(reader)
        assert hello["t"] == frames.HELLO
        writer.write(garbage)
        await writer.drain()
        async with asyncio.timeout(10):
            try:
                while True:  # an ERROR frame may come first, then EOF
                    await frames.read_frame(reader)
            except asyncio.IncompleteReadError:
                pass
        # the process and the other connection are unaffected
        key = await good.key_op("keys.create", {"scheme": "ed25519"})
        assert key["ok"] is True
    finally:
        writer.close()
        await good.close()
