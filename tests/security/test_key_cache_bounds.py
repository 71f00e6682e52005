"""The sealed records a host pushes are held in a bounded cache: a host cannot make an enclave hold
more keys or more bytes of records than its settings allow, and a key pushed out of the cache is
answered `unknown_key` (never signed from a stale copy) until the host pushes it again.

Real enclave worker and dev KMS processes; the attacker speaks raw frames (tests/security/hostile.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from schemas import frames
from tests.rig import digest_req, recovered
from tests.security.hostile import Stage, enclave_rss_kib


async def _stats(stage: Stage) -> dict[str, Any]:
    ch = await stage.channel()
    await ch.send({"t": frames.PING, "id": 7})
    pong = await ch.read(timeout=10)
    await ch.close()
    assert pong["t"] == frames.PONG
    return dict(pong["stats"])


def _fat_record(i: int) -> dict[str, Any]:
    """A well-typed sealed record (that opens with nothing) with a ~45 KiB policy."""
    allow = [f"0x{i:08x}{j:032x}" for j in range(1000)]
    return {"v": 1, "key_id": f"k_{i:08d}", "keyring_id": "r", "dek_version": 1, "scheme": "secp256k1",
            "public_key": b"p", "nonce": b"n" * 12, "ciphertext": b"c", "created_ms": 1,
            "policy": {"to_allowlist": allow}}  # fmt: skip


@pytest.fixture
async def small_cache(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Stage]:
    """One enclave worker holding at most 3 keys, 1 MiB of records and 2 opened wallets."""
    env = {"ENCLAVE_MAX_KEYS": "3", "ENCLAVE_MAX_KEY_BYTES": str(1024 * 1024), "ENCLAVE_MAX_OPEN_KEYS": "2"}
    s = await Stage(tmp_path, sock_dir).start(enclaves=1, env=env)
    try:
        yield s
    finally:
        await s.stop()


async def test_a_flood_of_records_is_held_within_the_byte_bound(tmp_path: Path, sock_dir: Path) -> None:
    """200 MiB of fat records (4,400 keys with 45 KiB policies) pushed at an enclave that holds at most
    4 MiB of them: it keeps serving, holds at most 4 MiB, and its memory does not grow with the flood.
    (Before the byte bound the enclave kept all of them: up to 1,000,000 keys of any policy size.)"""
    env = {"ENCLAVE_MAX_KEY_BYTES": str(4 * 1024 * 1024)}
    stage = await Stage(tmp_path, sock_dir).start(enclaves=1, env=env)
    try:
        before = enclave_rss_kib(stage.enclaves[0])
        ch = await stage.channel()
        frames_sent = 110
        for f in range(frames_sent):
            keys = [_fat_record(f * 40 + i) for i in range(40)]
            reply = await ch.key_op("keyrings.load", {"envelopes": [], "keys": keys})
            assert reply["ok"] is True, reply
        await ch.close()
        stats = await _stats(stage)
        assert stats["key_bytes"] <= 4 * 1024 * 1024
        assert stats["keys_loaded"] < 100
        assert stats["keys_evicted"] == frames_sent * 40 - stats["keys_loaded"]
        grown = enclave_rss_kib(stage.enclaves[0]) - before
        assert grown < 60 * 1024, f"the enclave grew by {grown} KiB"
    finally:
        await stage.stop()


async def test_a_key_pushed_out_is_unknown_until_pushed_again(small_cache: Stage) -> None:
    """Six keys through an enclave that holds three: every one still signs through the honest host
    (which pushes a key again on `unknown_key`), while the attacker's channel, which pushes nothing,
    gets `unknown_key` for keys the cache let go - and never a signature."""
    stage = small_cache
    assert stage.operator is not None and stage.backend is not None
    keys = [await stage.operator.create_key("secp256k1", f"kr{i % 2}") for i in range(6)]
    stats = await _stats(stage)
    assert stats["keys_loaded"] <= 3 and stats["keys_evicted"] >= 3
    assert stats["keys_opened"] <= 2

    # the attacker's raw channel: the first keys were pushed out by the later ones
    ch = await stage.channel()
    await ch.send({"t": frames.SIGN, "items": [[1, msgpack.packb(digest_req("a1", keys[0]["key_id"]))]]})
    (result,) = (await ch.results(1)).values()
    await ch.close()
    assert result["status"] == "error" and result["error"]["code"] == "unknown_key"
    assert "signature" not in result

    # the honest host signs with every key, pushing each again when it was let go
    for round_ in range(2):
        for i, key in enumerate(keys):
            req = digest_req(f"h{round_}-{i}", key["key_id"])
            res = await stage.backend.sign(key["key_id"], msgpack.packb(req))
            assert res["status"] == "ok", res
            assert recovered(req, res) == key["address"]  # eth-account recovers the key's address
    stats = await _stats(stage)
    assert stats["keys_loaded"] <= 3 and stats["keys_opened"] <= 2


def test_the_bounds_are_documented() -> None:
    text = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for name in ("ENCLAVE_MAX_KEYS", "ENCLAVE_MAX_KEY_BYTES", "ENCLAVE_MAX_OPEN_KEYS"):
        assert name in text
