"""A new enclave connection gets every keyring envelope but at most SIGNER_PRELOAD_KEYS sealed keys (the
most recently created); every other key is pushed when it is first asked for. An enclave's second
connection gets no keys again, a restarted enclave gets them again, and keys.list and keys.rotate_dek
work on an enclave that was given no key.

Real dev KMS and enclave worker processes; the host's enclave backend in-process over a dir:// store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from signer.backend import EnclaveBackend
from signer.channel import ChannelSettings, EnclaveConnection
from signer.keystore import open_keystore
from signer.pool import PoolSettings
from tests.enclaves import wait_until
from tests.rig import Rig, digest_req, recovered

KEYS = 6


class Pushes:
    """What the backend sends each connection in keyrings.load frames (observed, then sent as it was)."""

    def __init__(self, backend: EnclaveBackend) -> None:
        self.keys: dict[str, list[str]] = {}  # connection name -> key ids, in the order sent
        self.envelopes: dict[str, int] = {}
        for conn in backend.pool.connections:
            self._watch(conn)

    def _watch(self, conn: EnclaveConnection) -> None:
        send = conn.key_op

        async def key_op(op: str, args: dict[str, Any]) -> dict[str, Any]:
            if op == "keyrings.load":
                self.keys.setdefault(conn.name, []).extend(k["key_id"] for k in args["keys"])
                self.envelopes[conn.name] = self.envelopes.get(conn.name, 0) + len(args["envelopes"])
            return await send(op, args)

        conn.key_op = key_op  # type: ignore[method-assign]

    def clear(self) -> None:
        self.keys.clear()
        self.envelopes.clear()


@pytest.fixture
async def rig(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Rig]:
    """One enclave and KEYS keys in two keyrings, created through the rig's backend."""
    r = await Rig(tmp_path, sock_dir, enclaves=1).start()
    try:
        r.keys = [await r.create("secp256k1", f"ring{i % 2}") for i in range(KEYS)]  # type: ignore[attr-defined]
        yield r
    finally:
        await r.stop()


async def _backend(rig: Rig, url: str, preload_keys: int) -> tuple[EnclaveBackend, Pushes]:
    """A second host's backend over the same store, to the enclave at `url`, two connections."""
    settings = PoolSettings(connections_per_enclave=2, channel=ChannelSettings(heartbeat_interval_s=0.1))
    backend = EnclaveBackend([url], open_keystore(rig.topology.keystore_url), settings, preload_keys=preload_keys)
    rig.topology.backends.append(backend)  # closed with the topology
    pushes = Pushes(backend)
    await backend.start(ready_timeout=20)
    await wait_until(lambda: len(backend.pool.live()) == 2, what="both connections")
    return backend, pushes


async def _keys_held(backend: EnclaveBackend) -> int:
    """The enclave's count of sealed records it holds, from a pong that came after now."""
    conn = backend.pool.live()[0]
    before = conn.enclave_stats
    await wait_until(lambda: conn.enclave_stats is not before, what="a fresh pong")
    return int(conn.enclave_stats["keys_loaded"])


async def _signs_every_key(backend: EnclaveBackend, keys: list[dict[str, Any]], tag: str) -> None:
    reqs = [digest_req(f"{tag}-{i}", k["key_id"]) for i, k in enumerate(keys)]
    results = await backend.sign_many([(r["key_id"], msgpack.packb(r)) for r in reqs])
    for req, res, key in zip(reqs, results, keys, strict=True):
        assert res["status"] == "ok", res
        assert recovered(req, res) == key["address"]


async def test_a_new_enclave_gets_the_newest_keys_once_and_the_rest_when_asked(rig: Rig) -> None:
    keys: list[dict[str, Any]] = rig.keys  # type: ignore[attr-defined]
    fresh = await rig.topology.start_enclave("fresh")
    backend, pushes = await _backend(rig, fresh.url, preload_keys=2)
    newest = [k.key_id for k in sorted(backend.store.keys(), key=lambda k: k.created_ms)[-2:]]
    # one of the enclave's two connections got the two newest keys (oldest first), the other none;
    # both got both keyrings' envelopes
    assert sorted(pushes.keys.values(), key=len) == [[], newest]
    assert list(pushes.envelopes.values()) == [2, 2]
    assert await _keys_held(backend) == 2
    await _signs_every_key(backend, keys, "cold")  # the other four are pushed on their first request
    assert await _keys_held(backend) == KEYS


async def test_a_restarted_enclave_gets_its_keys_again(rig: Rig) -> None:
    keys: list[dict[str, Any]] = rig.keys  # type: ignore[attr-defined]
    fresh = await rig.topology.start_enclave("fresh")
    backend, pushes = await _backend(rig, fresh.url, preload_keys=3)
    pushes.clear()
    await fresh.process.astop()
    await rig.topology.start_enclave("fresh")  # the same address: the pool reconnects both connections
    await wait_until(lambda: len(pushes.envelopes) == 2 and len(backend.pool.live()) == 2, timeout=20,
                     what="both connections back")  # fmt: skip
    assert sorted(len(k) for k in pushes.keys.values()) == [0, 3]
    assert await _keys_held(backend) == 3
    await _signs_every_key(backend, keys, "again")


async def test_keys_list_and_rotation_work_on_an_enclave_given_no_keys(rig: Rig) -> None:
    keys: list[dict[str, Any]] = rig.keys  # type: ignore[attr-defined]
    fresh = await rig.topology.start_enclave("fresh")
    backend, pushes = await _backend(rig, fresh.url, preload_keys=0)
    assert all(not k for k in pushes.keys.values()) and await _keys_held(backend) == 0
    operator = rig.dev.admin(backend.handle)
    rotated = await operator.rotate_dek("ring0")  # the host pushes the keyring's keys first
    assert rotated["dek_version"] == 2 and len(rotated["keys"]) == KEYS // 2
    listed = await operator.list_keys()  # ring1's keys too, though the enclave was never asked for them
    assert sorted(k["key_id"] for k in listed) == sorted(k["key_id"] for k in keys)
    await _signs_every_key(backend, keys, "rotated")


async def test_many_batches_of_keys_pushed_at_once_keep_every_connection(rig: Rig) -> None:
    """An enclave refuses more than 8 key operations in flight on one connection (it drops the connection):
    KEYS batches at once, each of one key the enclave was never given, all sign and no connection is lost."""
    keys: list[dict[str, Any]] = rig.keys  # type: ignore[attr-defined]
    fresh = await rig.topology.start_enclave("fresh")
    backend, _ = await _backend(rig, fresh.url, preload_keys=0)
    connects = [c.stats.connects for c in backend.pool.connections]
    for round_ in range(3):  # 18 batches: the same keys again are pushed again only if the enclave lacks them
        reqs = [digest_req(f"burst{round_}-{i}", k["key_id"]) for i, k in enumerate(keys * 3)]
        results = await asyncio.gather(*(backend.sign(r["key_id"], msgpack.packb(r)) for r in reqs))
        assert [r["status"] for r in results] == ["ok"] * len(reqs), results
    assert [c.stats.connects for c in backend.pool.connections] == connects
    assert all(c.connected for c in backend.pool.connections)
