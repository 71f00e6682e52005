"""Enclave-enforced policy and request authentication, with real enclave and dev KMS processes.

Every policy rule and every authentication failure is provoked and its code checked;
client signatures are made with `cryptography` (the reference library), verified by the enclave.
"""

from __future__ import annotations

import copy
import os
import random
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_account import Account
from eth_account.messages import encode_typed_data

from enclave_worker.auth import canonical_encoding
from schemas.sign_result import STATUSES
from tests.rig import Rig, digest_req, recovered
from tests.unit.test_eip712 import MAIL

ED_CLIENT = Ed25519PrivateKey.generate()
EC_CLIENT = ec.generate_private_key(ec.SECP256K1())
ED_PUB = ED_CLIENT.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
EC_PUB = (
    EC_CLIENT.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint).hex()
)
CLIENTS = {
    "payments": {"scheme": "ed25519", "public_key": ED_PUB},
    "treasury": {"scheme": "secp256k1", "public_key": EC_PUB},
}
ALLOWED_TO = "0x" + "11" * 20


@pytest.fixture
async def rig(tmp_path: Path, sock_dir: Path) -> Any:
    r = await Rig(tmp_path, sock_dir).start()
    yield r
    await r.stop()


def tx_req(rid: str, key_id: str, **tx: Any) -> dict[str, Any]:
    payload = {"type": 2, "chainId": 1, "nonce": 0, "to": ALLOWED_TO, "value": 1000, "gas": 21000,
               "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 10**9}  # fmt: skip
    payload.update(tx)
    payload = {k: v for k, v in payload.items() if v is not None}
    return {"v": 1, "request_id": rid, "key_id": key_id, "scheme": "eth_tx", "payload": payload}


def signed(req: dict[str, Any], client: str = "payments", ts_ms: int | None = None, nonce: bytes | None = None,
           tamper: bool = False) -> dict[str, Any]:  # fmt: skip
    ts = ts_ms if ts_ms is not None else int(time.time() * 1000)
    nonce = nonce or os.urandom(16)
    message = canonical_encoding(req, ts, nonce)
    if tamper:
        message += b"x"
    if client == "treasury":
        sig = EC_CLIENT.sign(message, ec.ECDSA(hashes.SHA256()))
    else:
        sig = ED_CLIENT.sign(message)
    return {**req, "auth": {"client_id": client, "ts_ms": ts, "nonce": nonce, "sig": sig}}


def codes(results: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(r["status"], (r.get("error") or {}).get("code")) for r in results]


async def test_each_policy_rule_is_enforced(rig: Rig) -> None:
    policy = {"schemes": ["eth_tx", "eth_typed_data"], "chain_ids": [1], "to_allowlist": [ALLOWED_TO],
              "max_value": "0x3e8"}  # fmt: skip
    key = await rig.create(policy=policy)
    k = key["key_id"]
    reqs = [
        tx_req("ok", k),
        tx_req("chain", k, chainId=10),
        tx_req("dest", k, to="0x" + "22" * 20),
        tx_req("create", k, to=None),
        tx_req("value", k, value=1001),
        digest_req("scheme", k),
        {"v": 1, "request_id": "typed-ok", "key_id": k, "scheme": "eth_typed_data", "payload": MAIL},
        {
            "v": 1,
            "request_id": "typed-chain",
            "key_id": k,
            "scheme": "eth_typed_data",
            "payload": {**MAIL, "domain": {**MAIL["domain"], "chainId": 5}},
        },
    ]
    results = await rig.sign(reqs)
    assert codes(results) == [
        ("ok", None),
        ("rejected", "policy_chain_id"),
        ("rejected", "policy_destination"),
        ("rejected", "policy_destination"),
        ("rejected", "policy_value_cap"),
        ("rejected", "policy_scheme"),
        ("ok", None),
        ("rejected", "policy_chain_id"),
    ]
    assert Account.recover_transaction(results[0]["raw_tx"]) == key["address"]
    typed = Account.sign_message(encode_typed_data(full_message=MAIL), b"\0" * 31 + b"\1")  # shape reference only
    assert len(results[6]["signature"]) == len(typed.signature) and results[6]["signature"][64] in (27, 28)
    assert (
        Account.recover_message(encode_typed_data(full_message=MAIL), signature=results[6]["signature"])
        == key["address"]
    )
    assert key["policy"] == policy  # the public description shows the sealed policy


async def test_a_bad_policy_is_refused_at_creation(rig: Rig) -> None:
    from signer.keys import KeyOpError

    for bad in ({"schemes": ["rsa"]}, {"max_value": -1}, {"require_auth": True}, {"surprise": 1},
                {"clients": {"c": {"scheme": "ed25519", "public_key": "00"}}}):  # fmt: skip
        with pytest.raises(KeyOpError) as info:
            await rig.create(policy=bad)
        assert info.value.code == "invalid_policy"


async def test_the_host_cannot_loosen_a_sealed_policy(rig: Rig) -> None:
    key = await rig.create(policy={"schemes": ["eth_personal"]})
    store = rig.backend.store  # type: ignore[union-attr]
    sealed = store.get_key(key["key_id"])
    from schemas.records import SealedKey

    loosened = SealedKey(**{**{f: getattr(sealed, f) for f in SealedKey.__dataclass_fields__}, "policy": None})
    await rig.pool.broadcast("keyrings.load", {"envelopes": [], "keys": [loosened.to_wire()]})  # type: ignore[union-attr]
    res = (await rig.sign([digest_req("sneaky", key["key_id"])]))[0]
    assert (res["status"], res["error"]["code"]) == ("error", "sealed_key_invalid")
    assert "signature" not in res


async def test_authentication_accepts_registered_clients_and_refuses_everything_else(rig: Rig) -> None:
    key = await rig.create(policy={"require_auth": True, "clients": CLIENTS})
    k = key["key_id"]
    reused = os.urandom(16)
    first = signed(digest_req("a-ok-ed", k), nonce=reused)
    reqs = [
        first,
        signed(digest_req("a-ok-ec", k), client="treasury"),
        digest_req("a-none", k),
        signed(digest_req("a-bad", k), tamper=True),
        signed(digest_req("a-stale", k), ts_ms=int(time.time() * 1000) - 3_600_000),
        signed(digest_req("a-unknown", k), client="payments")
        | {"auth": {**signed(digest_req("x", k))["auth"], "client_id": "mallory"}},
        {**digest_req("a-malformed", k), "auth": {"client_id": "payments", "ts_ms": "now"}},
    ]
    results = await rig.sign(reqs)
    assert codes(results) == [
        ("ok", None),
        ("ok", None),
        ("rejected", "auth_required"),
        ("rejected", "auth_bad_signature"),
        ("rejected", "auth_stale"),
        ("rejected", "auth_unknown_client"),
        ("rejected", "auth_malformed"),
    ]
    assert recovered(reqs[0], results[0]) == key["address"] and recovered(reqs[1], results[1]) == key["address"]
    # the same nonce on another request is a replay; the same request again is a redelivery
    replay = signed(digest_req("a-replay", k), nonce=reused)
    again = await rig.sign([replay, first])
    assert codes(again)[0] == ("rejected", "auth_replayed")
    assert again[1]["signature"] == results[0]["signature"] and again[1]["status"] == "ok"
    # a key without registered clients refuses authenticated requests it cannot check
    plain = await rig.create()
    res = (await rig.sign([signed(digest_req("a-noclients", plain["key_id"]))]))[0]
    assert codes([res]) == [("rejected", "auth_unknown_client")]


def _fuzz_payloads(rnd: random.Random, key_id: str, ed_key: str) -> list[dict[str, Any]]:
    junk: list[Any] = [None, True, -1, 2**63, "0x", "0xzz", "", b"", b"\0" * 33, [], {}, [[[]]], {"a": {"b": {}}},
                       "x" * 5000, os.urandom(70_000), 1.5]  # fmt: skip
    base_tx = tx_req("t", key_id)["payload"]
    out = []
    for i in range(1500):
        kind = i % 6
        if kind == 0:
            tx = copy.deepcopy(base_tx)
            field = rnd.choice([*list(tx), "accessList", "from", "data", "bogus"])
            tx[field] = rnd.choice(junk)
            req = {"scheme": "eth_tx", "payload": tx}
        elif kind == 1:
            doc = copy.deepcopy(MAIL)
            target = rnd.choice(["types", "domain", "message", "primaryType"])
            doc[target] = rnd.choice(junk) if rnd.random() < 0.5 else doc[target]
            if rnd.random() < 0.5 and isinstance(doc["message"], dict):
                doc["message"]["to"] = [{"name": rnd.choice(junk), "wallets": rnd.choice(junk)}] * rnd.randint(0, 3)
            req = {"scheme": "eth_typed_data", "payload": doc}
        elif kind == 2:
            req = {
                "scheme": rnd.choice(["secp256k1_digest", "eth_personal"]),
                "payload": rnd.choice([*junk, os.urandom(32)]),
            }
        elif kind == 3:
            req = {"scheme": "ed25519", "payload": rnd.choice([*junk, os.urandom(rnd.randint(0, 100))])}
        elif kind == 4:
            req = {"scheme": "eth_tx", "payload": base_tx, "auth": rnd.choice(junk)}
        else:
            req = {
                "scheme": "eth_tx",
                "payload": {**base_tx, "accessList": [{"address": ALLOWED_TO, "storageKeys": [rnd.choice(junk)]}]},
            }
        out.append({"v": 1, "request_id": f"f{i}", "key_id": ed_key if req["scheme"] == "ed25519" else key_id, **req})
    return out


async def test_fuzzed_payloads_never_crash_the_enclave(rig: Rig) -> None:
    key = await rig.create()
    ed = await rig.create(scheme="ed25519")
    reqs = _fuzz_payloads(random.Random(1234), key["key_id"], ed["key_id"])
    raws = []
    for r in reqs:
        try:
            raws.append((r["key_id"], msgpack.packb(r)))
        except (OverflowError, TypeError):
            continue  # not representable in msgpack: a producer could not send it either
    results = await rig.backend.sign_many(raws)  # type: ignore[union-attr]
    assert len(results) == len(raws) > 1000
    assert all(r["status"] in STATUSES for r in results)
    assert all(r["status"] == "ok" or r.get("error", {}).get("code") for r in results)
    assert all(r["error"]["code"] != "internal" for r in results if r["status"] != "ok"), [
        r["error"] for r in results if r["status"] != "ok" and r["error"]["code"] == "internal"
    ][:3]
    # and the enclave still serves
    after = (await rig.sign([digest_req("after-fuzz", key["key_id"])]))[0]
    assert after["status"] == "ok" and all(e.process.running for e in rig.topology.enclaves.values())


async def test_a_transaction_from_another_address_is_refused(rig: Rig) -> None:
    key = await rig.create()
    other = Account.create().address
    mine, theirs = (
        tx_req("from-me", key["key_id"], **{"from": key["address"]}),
        tx_req("from-other", key["key_id"], **{"from": other}),
    )
    res = await rig.sign([mine, theirs])
    assert res[0]["status"] == "ok" and Account.recover_transaction(res[0]["raw_tx"]) == key["address"]
    assert codes(res[1:]) == [("rejected", "sender_mismatch")] and "signature" not in res[1]
