"""What an enclave vouches for is what its key really is: attacks found by attacking the enclave's
own key-custody changes (a host-chosen address in a record; a keyring version swapped in while a
key is created)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import msgpack
import pytest

from devkms.pki import load_dev_pki
from schemas import frames
from signer.operator import AdminSession, OperatorKey, ReceiptError
from tests.rig import digest_req, recovered
from tests.security.hostile import HostileChannel, Stage


@pytest.fixture
async def stage(tmp_path: Path, sock_dir: Path) -> Any:
    s = await Stage(tmp_path, sock_dir).start(enclaves=1)
    try:
        yield s
    finally:
        await s.stop()


def _session(stage: Stage, call: Any) -> AdminSession:
    assert stage.dev is not None
    return AdminSession(call, [OperatorKey.load(stage.dev.operator_key_path)],
                        load_dev_pki(stage.tmp / "devkms" / "pki").root, stage.dev.pcr0)  # fmt: skip


async def test_a_host_chosen_address_is_never_vouched_for(stage: Stage) -> None:
    assert stage.operator is not None
    key = await stage.operator.create_key("secp256k1", "kr")
    record_file = next((stage.tmp / "keystore").rglob(f"{key['key_id']}*"))
    record = msgpack.unpackb(record_file.read_bytes())
    forged = {**record, "address": "0x95578f75E23E5473ff97FaA7d1edDF08492889bF"}  # the attacker's address
    ch = await stage.channel()
    assert (await ch.key_op("keyrings.load", {"envelopes": [], "keys": [forged]}))["ok"]
    listed = await stage.operator.list_keys()
    assert all(k["address"] != forged["address"] for k in listed), listed
    await ch.send({"t": frames.SIGN, "items": [[1, msgpack.packb(digest_req("x", key["key_id"]))]]})
    (res,) = (await ch.results(1)).values()
    assert res["error"]["code"] == "sealed_key_invalid", res  # a record with another address does not open
    assert (await ch.key_op("keyrings.load", {"envelopes": [], "keys": [record]}))["ok"]
    listed = await stage.operator.list_keys()
    assert [(k["key_id"], k["address"]) for k in listed] == [(key["key_id"], key["address"])]
    await ch.close()


async def test_the_cli_recomputes_the_address_from_the_public_key(stage: Stage) -> None:
    """Even a correctly signed receipt naming an address that is not its public key's is refused."""
    assert stage.operator is not None
    enclave = await stage.operator.enclave()
    from signer.operator import _describe

    good = {"scheme": "secp256k1", "public_key": bytes.fromhex("04" + "11" * 64), "address": "0x" + "22" * 20}
    with pytest.raises(ReceiptError, match="address"):
        _describe(good, enclave)


async def test_a_version_swapped_in_during_create_cannot_mislabel_the_key(stage: Stage) -> None:
    assert stage.dev is not None
    ch = await stage.channel()
    bogus = {"v": 1, "keyring_id": "fresh", "kms_key_id": stage.dev.kms_key_arn, "dek_version": 2,
             "encrypted_dek": b"x" * 64, "created_ms": 1}  # fmt: skip
    seen: dict[str, Any] = {}

    async def relay(op: str, args: dict[str, Any]) -> dict[str, Any]:
        args = {k: v for k, v in args.items() if k != "enclave_id"}
        if op != "keys.create":
            return dict((await ch.key_op(op, args))["result"])
        await ch.send({"t": frames.KEY_OP, "id": 77, "op": op, "args": args},
                      {"t": frames.KEY_OP, "id": 78, "op": "keyrings.load", "args": {"envelopes": [bogus], "keys": []}})  # fmt: skip
        while True:
            body = await ch.read()
            if body["t"] == frames.KEY_OP_RESULT and body["id"] == 77:
                assert body["ok"], body
                seen.update(body["result"])
                return dict(body["result"])

    key = await _session(stage, relay).create_key("secp256k1", "fresh")
    assert key["dek_version"] == seen["sealed"]["dek_version"] == seen["envelope"]["dek_version"] == 1
    # what the key store would hold opens, in this enclave and in a fresh one
    url = await stage.start_enclave("fresh")
    for channel in (ch, await HostileChannel.open(url)):
        load = {"envelopes": [seen["envelope"]], "keys": [seen["sealed"]]}
        assert (await channel.key_op("keyrings.load", load))["ok"]
        req = digest_req("after", key["key_id"])
        await channel.send({"t": frames.SIGN, "items": [[1, msgpack.packb(req)]]})
        (res,) = (await channel.results(1)).values()
        assert res["status"] == "ok" and recovered(req, res) == key["address"], res
        await channel.close()


async def test_an_envelope_that_won_elsewhere_replaces_the_cached_data_key(tmp_path: Path, sock_dir: Path) -> None:
    """Two hosts, each with its own key store and enclave, create the same keyring version: each enclave
    caches its own data key. When the store's winner (host A's) is pushed to the losing enclave B, B
    must sign A's keys (not answer sealed_key_invalid with its own cached data key until its TTL), and a
    key created through B afterwards must be sealed under the winner's data key, so that A opens it."""
    from signer.backend import EnclaveBackend
    from signer.keystore import open_keystore

    stage = await Stage(tmp_path, sock_dir).start(enclaves=2)
    backends: list[EnclaveBackend] = []
    try:
        assert stage.dev is not None
        for name, url in zip("ab", stage.urls, strict=True):
            backend = EnclaveBackend([url], open_keystore(f"dir://{tmp_path / ('store-' + name)}"))
            await backend.start(ready_timeout=20)
            backends.append(backend)
        host_a, host_b = backends
        op_a, op_b = stage.dev.admin(host_a.handle), stage.dev.admin(host_b.handle)
        key_a = await op_a.create_key("secp256k1", "kr")  # enclave A: keyring kr version 1, its data key
        await op_b.create_key("secp256k1", "kr")  # enclave B: its own kr version 1 (it lost the race)
        # B's store learns who won (as a shared store would have told it), and B's enclave gets the winner
        shutil.rmtree(tmp_path / "store-b")
        shutil.copytree(tmp_path / "store-a", tmp_path / "store-b")
        await host_b.store.refresh()
        winner = [e.to_wire() for e in host_b.store.envelopes()]
        a_keys = [k.to_wire() for k in host_b.store.keys()]
        await host_b.pool.broadcast("keyrings.load", {"envelopes": winner, "keys": a_keys})
        req = digest_req("a-through-b", key_a["key_id"])
        res = await host_b.pool.sign(key_a["keyring"], msgpack.packb(req))
        assert res["status"] == "ok", res
        assert recovered(req, res) == key_a["address"]
        # a key created through B now is sealed under the winner's data key: A's enclave opens it
        key_b2 = await op_b.create_key("secp256k1", "kr")
        sealed = next(k for k in host_b.store.keys() if k.key_id == key_b2["key_id"])
        assert sealed.dek_version == 1
        await host_a.pool.broadcast("keyrings.load", {"envelopes": [], "keys": [sealed.to_wire()]})
        req = digest_req("b2-through-a", key_b2["key_id"])
        res = await host_a.pool.sign(key_b2["keyring"], msgpack.packb(req))
        assert res["status"] == "ok", res
        assert recovered(req, res) == key_b2["address"]
    finally:
        for backend in backends:
            await backend.close()
        await stage.stop()
