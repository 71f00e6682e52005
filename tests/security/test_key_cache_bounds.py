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

from bench.harness import cpu_seconds
from schemas import frames
from signer.keys import KeyOpError
from tests.rig import digest_req, recovered
from tests.security.hostile import Stage, enclave_rss_kib


async def _stats(stage: Stage) -> dict[str, Any]:
    ch = await stage.channel()
    await ch.send({"t": frames.PING, "id": 7})
    pong = await ch.read(timeout=10)
    await ch.close()
    assert pong["t"] == frames.PONG
    return dict(pong["stats"])


def _junk(key_id: str, policy: dict[str, Any], keyring: str = "r") -> dict[str, Any]:
    """A well-typed sealed record (that opens with nothing) with the given policy."""
    return {"v": 1, "key_id": key_id, "keyring_id": keyring, "dek_version": 1, "scheme": "secp256k1",
            "public_key": b"p", "nonce": b"n" * 12, "ciphertext": b"c" * 17, "created_ms": 1, "policy": policy}  # fmt: skip


def _allow_list(i: int) -> dict[str, Any]:  # ~45 KiB encoded
    return {"to_allowlist": [f"0x{i:08x}{j:032x}" for j in range(1000)]}


EMPTY_LISTS = {"a": [[] for _ in range(40_000)]}  # 40 KiB encoded, ~2.5 MiB as Python objects
EMPTY_MAPS = {"a": [{} for _ in range(40_000)]}


@pytest.fixture
async def small_cache(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Stage]:
    """One enclave worker holding at most 3 keys, 1 MiB of records and 2 opened wallets."""
    env = {"ENCLAVE_MAX_KEYS": "3", "ENCLAVE_MAX_KEY_BYTES": str(1024 * 1024), "ENCLAVE_MAX_OPEN_KEYS": "2"}
    s = await Stage(tmp_path, sock_dir).start(enclaves=1, env=env)
    try:
        yield s
    finally:
        await s.stop()


@pytest.mark.parametrize("kind", ["allow lists", "empty lists"])
async def test_a_flood_of_records_is_held_within_the_byte_bound(tmp_path: Path, sock_dir: Path, kind: str) -> None:
    """Load frame after load frame of fat records (4,400 keys with 45 KiB allow-lists, or 110 keys
    whose 40 KiB policies are 40,000 empty lists: ~2.5 MiB each once decoded) pushed at an enclave
    that holds at most 4 MiB of records: it holds at most that, as it counts them, and its memory does
    not grow with the flood. (Before the byte bound the enclave kept up to 1,000,000 keys of any
    policy size; a count of encoded bytes alone let the empty lists take 290 MiB.)"""
    env = {"ENCLAVE_MAX_KEY_BYTES": str(4 * 1024 * 1024)}
    stage = await Stage(tmp_path, sock_dir).start(enclaves=1, env=env)
    try:
        before = enclave_rss_kib(stage.enclaves[0])
        ch = await stage.channel()
        sent = 0
        for f in range(110):
            if kind == "allow lists":
                keys = [_junk(f"k_{f * 40 + i:08d}", _allow_list(f * 40 + i)) for i in range(40)]
            else:
                keys = [_junk(f"k_{f:08d}", EMPTY_LISTS)]
            reply = await ch.key_op("keyrings.load", {"envelopes": [], "keys": keys})
            assert reply["ok"] is True, reply
            sent += len(keys)
        await ch.close()
        stats = await _stats(stage)
        assert stats["key_bytes"] <= 4 * 1024 * 1024 or stats["keys_loaded"] == 1
        assert stats["keys_evicted"] == sent - stats["keys_loaded"]
        grown = enclave_rss_kib(stage.enclaves[0]) - before
        assert grown < 60 * 1024, f"the enclave grew by {grown} KiB"
    finally:
        await stage.stop()


async def test_a_record_that_does_not_open_costs_its_policy_once(tmp_path: Path, sock_dir: Path) -> None:
    """One junk record under a keyring whose data key is cached, with a policy of 40,000 empty maps
    (its canonical form takes ~17 ms to build), then one sign frame of 300 requests for it: the
    enclave refuses them all for ~one record's work, not 300 (which stalled its event loop ~6 s)."""
    stage = await Stage(tmp_path, sock_dir).start(enclaves=1)
    try:
        assert stage.operator is not None
        await stage.operator.create_key("secp256k1", "kr")  # the keyring's data key is now cached
        ch = await stage.channel()
        reply = await ch.key_op("keyrings.load", {"envelopes": [], "keys": [_junk("k_junk", EMPTY_MAPS, "kr")]})
        assert reply["ok"] is True, reply
        pid = stage.enclaves[0].pid
        cpu0 = cpu_seconds(pid)
        raw = msgpack.packb(digest_req("x", "k_junk"))
        await ch.send({"t": frames.SIGN, "items": [[i, raw] for i in range(300)]})
        results = await ch.results(300)
        spent = cpu_seconds(pid) - cpu0
        await ch.close()
        assert {r["error"]["code"] for r in results.values()} == {"sealed_key_invalid"}
        assert spent < 1.0, f"300 refusals of one record cost the enclave {spent:.2f} s of CPU"
    finally:
        await stage.stop()


async def test_envelopes_are_bounded_in_size_and_number(stage: Stage) -> None:
    """An envelope whose ciphertext is not the size of a KMS-wrapped data key is refused, and no more than
    10,000 keyring versions are held (each under the configured KMS key, as the enclave requires)."""
    assert stage.dev is not None
    arn = stage.dev.kms_key_arn
    ch = await stage.channel()

    def envelope(name: str, size: int = 184) -> dict[str, Any]:
        return {"v": 1, "keyring_id": name, "kms_key_id": arn, "dek_version": 1, "encrypted_dek": b"x" * size,
                "created_ms": 1}  # fmt: skip

    reply = await ch.key_op("keyrings.load", {"envelopes": [envelope("fat", 8192)], "keys": []})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_record"
    for f in range(10):
        envs = [envelope(f"g{f}-{i}") for i in range(1000)]
        reply = await ch.key_op("keyrings.load", {"envelopes": envs, "keys": []})
        assert reply["ok"] is True, reply
    reply = await ch.key_op("keyrings.load", {"envelopes": [envelope("one-more")], "keys": []})
    assert reply["ok"] is False and reply["error"]["code"] == "too_many_keys"
    await ch.close()


async def test_a_rotation_never_leaves_keys_behind(small_cache: Stage) -> None:
    """Five keys in a keyring, an enclave that holds three: the rotation is refused (`too_many_keys`)
    before anything changes, and every key still signs. (It used to reseal the three it held, commit,
    and leave two keys that no longer signed.)"""
    stage = small_cache
    assert stage.operator is not None and stage.backend is not None
    keys = [await stage.operator.create_key("secp256k1", "kr") for _ in range(5)]
    with pytest.raises(KeyOpError) as refused:
        await stage.operator.rotate_dek("kr")
    assert refused.value.code.value == "too_many_keys"
    for i, key in enumerate(keys):
        req = digest_req(f"after-{i}", key["key_id"])
        res = await stage.backend.sign(key["key_id"], msgpack.packb(req))
        assert res["status"] == "ok", res
        assert recovered(req, res) == key["address"]


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
