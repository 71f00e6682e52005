"""An enclave a hostile host cannot trick or exhaust: the record that is checked is the record that
signs, credits and caps are enforced by the enclave, and no frame costs it unbounded memory.

Real enclave worker and dev KMS processes; the attacker speaks raw frames (tests/security/hostile.py).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import frames
from tests.security.hostile import HostileChannel, Stage, enclave_rss_kib

POLICY = {"schemes": ["eth_tx"], "to_allowlist": ["0x" + "11" * 20], "max_value": 1000, "chain_ids": [1]}
FORBIDDEN_TX = {
    "type": 2,
    "chainId": 1,
    "nonce": 0,
    "to": "0x" + "22" * 20,
    "value": hex(10**21),
    "gas": 21000,
    "maxFeePerGas": 10**9,
    "maxPriorityFeePerGas": 1,
    "data": b"",
}
RSS_SLACK_KIB = 150 * 1024  # what a hostile frame may add to an enclave's memory, at most


def _sign_frame(*reqs: dict[str, Any], corr: int = 1) -> dict[str, Any]:
    return {"t": frames.SIGN, "items": [[corr + i, msgpack.packb(r)] for i, r in enumerate(reqs)]}


async def _serves(stage: Stage, i: int) -> None:
    ch = await stage.channel(i)
    await ch.send({"t": frames.PING, "id": 7})
    pong = await ch.read(timeout=10)
    assert (pong["t"], pong["id"]) == (frames.PONG, 7)
    await ch.close()


async def test_the_policy_checked_is_the_one_that_opens_and_signs(stage: Stage) -> None:
    """On a cold enclave the host loads a policy-stripped copy of a key's record, sends a forbidden
    transfer, and in the same write puts the genuine record back."""
    assert stage.operator is not None
    key = await stage.operator.create_key("secp256k1", "kr", POLICY)
    cold = 1 if key["enclave_id"] == "enc0" else 0  # this enclave has the record but never opened the keyring
    genuine = msgpack.unpackb(next((stage.tmp / "keystore").rglob(f"{key['key_id']}*")).read_bytes())
    stripped = {**genuine, "policy": None}
    ch = await stage.channel(cold)
    for attempt in range(4):
        req = {
            "v": 1,
            "request_id": f"steal{attempt}",
            "key_id": key["key_id"],
            "scheme": "eth_tx",
            "payload": FORBIDDEN_TX,
        }
        await ch.send(
            {"t": frames.KEY_OP, "id": 1, "op": "keyrings.load", "args": {"envelopes": [], "keys": [stripped]}},
            _sign_frame(req, corr=attempt * 10),
            {"t": frames.KEY_OP, "id": 2, "op": "keyrings.load", "args": {"envelopes": [], "keys": [genuine]}},
        )
        (res,) = (await ch.results(1)).values()
        assert res["status"] != "ok" and "signature" not in res and "raw_tx" not in res, res
        assert res["error"]["code"] in (
            "policy_scheme",
            "policy_destination",
            "policy_value_cap",
            "sealed_key_invalid",
        ), res
    # the stripped record alone never opens: its policy is bound to the key by the AEAD
    loaded = await ch.key_op("keyrings.load", {"envelopes": [], "keys": [stripped]})
    assert loaded["ok"], loaded  # the host may store anything; the enclave believes nothing until it opens
    await ch.send(
        _sign_frame(
            {"v": 1, "request_id": "alone", "key_id": key["key_id"], "scheme": "eth_tx", "payload": FORBIDDEN_TX},
            corr=100,
        ),
    )
    (res,) = (await ch.results(1)).values()
    assert res["error"]["code"] == "sealed_key_invalid", res
    await ch.close()


async def test_an_enclave_enforces_its_credits(stage: Stage) -> None:
    ch = await stage.channel()
    granted = int(ch.hello["credits"])
    junk = [[i, b"\x80"] for i in range(granted + 1)]
    await ch.send({"t": frames.SIGN, "items": junk})
    assert await ch.closed(), "a host that exceeds its credits loses the connection"
    await _serves(stage, 0)


async def test_key_operations_and_connections_are_capped(stage: Stage) -> None:
    from enclave_worker.server import MAX_CONNECTIONS, MAX_KEY_OPS_IN_FLIGHT

    ch = await stage.channel()
    flood = [
        {"t": frames.KEY_OP, "id": i, "op": "keys.list", "args": {"nonce": os.urandom(16)}}
        for i in range(MAX_KEY_OPS_IN_FLIGHT * 4)
    ]
    await ch.send(*flood)
    assert await ch.closed()
    held = [await HostileChannel.open(stage.urls[1]) for _ in range(MAX_CONNECTIONS - 1)]  # the pool holds one
    try:
        reader, writer = await asyncio.open_unix_connection(stage.urls[1].removeprefix("unix://"))
        assert await reader.read() == b"", "connections beyond the cap are closed at once"
        writer.close()
    finally:
        for h in held:
            await h.close()
    await _serves(stage, 1)


NESTED: Any = 1
for _ in range(500):  # 500 levels of lists: deeper than any recursion the enclave may do
    NESTED = [NESTED]


def _sealed_record(key_id: str, policy: Any) -> dict[str, Any]:
    """A well-typed sealed-key record (that opens with nothing) carrying a hostile policy."""
    return {"v": 1, "key_id": key_id, "keyring_id": "r", "dek_version": 1, "scheme": "secp256k1",
            "public_key": b"p", "nonce": b"n" * 12, "ciphertext": b"c", "created_ms": 1, "policy": policy}  # fmt: skip


HOSTILE_FRAMES = {
    "bytes(int) in a record": {
        "t": frames.KEY_OP,
        "id": 1,
        "op": "keyrings.load",
        "args": {
            "envelopes": [
                {
                    "v": 1,
                    "keyring_id": "k",
                    "kms_key_id": "arn",
                    "dek_version": 1,
                    "encrypted_dek": 1_500_000_000,
                    "created_ms": 1,
                }
            ],
            "keys": [],
        },
    },
    "huge key list": {
        "t": frames.KEY_OP,
        "id": 2,
        "op": "keyrings.load",
        "args": {"envelopes": [], "keys": [{"key_id": "x"}] * 200_000},
    },
    "deep policy": {
        "t": frames.KEY_OP,
        "id": 3,
        "op": "keyrings.load",
        "args": {
            "envelopes": [],
            "keys": [_sealed_record("k_1", {"a": NESTED})],
        },
    },
    "nested request": _sign_frame(
        {"v": 1, "request_id": "n", "key_id": "k", "scheme": "eth_typed_data", "payload": {"types": NESTED}}
    ),
    "half a million empty maps": {"t": frames.SIGN, "items": [{}] * 500_000},
    "a wide policy": {
        "t": frames.KEY_OP,
        "id": 4,
        "op": "keyrings.load",
        "args": {
            "envelopes": [],
            "keys": [_sealed_record("k_2", {"to_allowlist": ["0x" + "ab" * 20] * 40_000})],
        },
    },
    "big int deadline": _sign_frame(
        {
            "v": 1,
            "request_id": "d",
            "key_id": "k",
            "scheme": "secp256k1_digest",
            "payload": b"\0" * 32,
            "deadline_ms": 2**63,
        }
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FRAMES))
async def test_a_hostile_frame_costs_no_unbounded_memory(stage: Stage, name: str) -> None:
    before = enclave_rss_kib(stage.enclaves[0])
    ch = await stage.channel()
    await ch.send(HOSTILE_FRAMES[name])
    try:
        reply = await ch.read(timeout=20)
        if reply["t"] == frames.KEY_OP_RESULT:
            assert reply["ok"] is False and reply["error"]["code"], reply
        elif reply["t"] == frames.RESULTS:
            assert all(r["status"] != "ok" for _, r in reply["items"])
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # a dropped connection is an acceptable answer
    await ch.close()
    await _serves(stage, 0)
    assert enclave_rss_kib(stage.enclaves[0]) - before < RSS_SLACK_KIB


# -- the hostile-host fuzzer: well-formed frames with adversarial values -------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("SIGNER_FUZZ_EXAMPLES", "300"))  # longer runs: set it higher

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([2**63 - 1, -1, 0, 2**64 - 1]),
    st.binary(max_size=64),
    st.text(max_size=40),
    st.sampled_from(["0x", "0x" + "ff" * 40, "k_" + "0" * 20]),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=25,
)
_ops = st.sampled_from(
    [
        "keyrings.load",
        "enclave.identity",
        "keys.create",
        "keys.import",
        "keys.rotate_dek",
        "keys.list",
        "kms.credentials",
    ]
)
_arg_names = st.sampled_from(
    [
        "envelopes",
        "keys",
        "keyring",
        "scheme",
        "policy",
        "operation",
        "approvals",
        "encrypted_key",
        "nonce",
        "access_key_id",
        "secret_access_key",
    ]
)


def _fuzz_strategies(key_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    request = st.fixed_dictionaries(
        {
            "v": st.sampled_from([1, 1, 1, 2]),
            "request_id": st.text(min_size=1, max_size=20),
            "key_id": st.sampled_from(key_ids),
            "scheme": st.sampled_from(["eth_tx", "eth_personal", "eth_typed_data", "secp256k1_digest", "ed25519", "x"]),
            "payload": _value,
        },
        optional={"deadline_ms": _scalar, "auth": _value, "reply_topic": _scalar},
    )
    sign = st.lists(request, min_size=1, max_size=4).map(
        lambda rs: {"t": frames.SIGN, "items": [[i, msgpack.packb(r)] for i, r in enumerate(rs)]}
    )
    key_op = st.builds(
        lambda op, args, i: {"t": frames.KEY_OP, "id": i, "op": op, "args": args},
        _ops,
        st.dictionaries(_arg_names, _value, max_size=5),
        st.integers(0, 2**31),
    )
    ping = st.builds(lambda i: {"t": frames.PING, "id": i}, _value)
    return st.one_of(sign, key_op, ping)


async def test_fuzzed_frames_from_a_hostile_host_end_in_refusals(stage: Stage) -> None:
    assert stage.operator is not None
    keys = [
        await stage.operator.create_key("secp256k1", "kr", POLICY),
        await stage.operator.create_key(
            "secp256k1", "kr", {"schemes": ["eth_personal", "eth_typed_data"], "chain_ids": [1]}
        ),
        await stage.operator.create_key("ed25519", "kr"),
    ]
    key_ids = [k["key_id"] for k in keys] + ["k_unknown"]
    before = enclave_rss_kib(stage.enclaves[0])
    outcomes: dict[str, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_fuzz_strategies(key_ids))
    def run(body: dict[str, Any]) -> None:
        outcome = asyncio.run_coroutine_threadsafe(_one(stage, body, key_ids), loop).result(60)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(run)
    await _serves(stage, 0)
    assert enclave_rss_kib(stage.enclaves[0]) - before < RSS_SLACK_KIB
    assert sum(outcomes.values()) == FUZZ_EXAMPLES, outcomes
    assert outcomes.get("signed_against_policy", 0) == 0, outcomes


async def _one(stage: Stage, body: dict[str, Any], key_ids: list[str]) -> str:
    ch = await stage.channel()
    try:
        await ch.send(body)
        if body["t"] == frames.SIGN:
            results = await ch.results(len(body["items"]))
            for corr, res in results.items():
                req = msgpack.unpackb(body["items"][corr][1], strict_map_key=False)
                if res["status"] == "ok":
                    # a policy's schemes list holds whatever else the fuzzer sends
                    allowed = {key_ids[0]: ("eth_tx",), key_ids[1]: ("eth_personal", "eth_typed_data")}
                    if req["scheme"] not in allowed.get(req["key_id"], (req["scheme"],)):
                        return "signed_against_policy"
                else:
                    assert res["error"]["code"] and res["status"] in ("error", "rejected", "expired"), res
            return "sign"
        reply = await ch.read(timeout=30)
        if body["t"] == frames.KEY_OP:
            assert reply["t"] == frames.KEY_OP_RESULT and (reply["ok"] or reply["error"]["code"]), reply
            return "key_op"
        return "ping"
    except (asyncio.IncompleteReadError, ConnectionError):
        return "dropped"
    finally:
        await ch.close()


async def test_requests_waiting_for_a_keyring_are_bounded_in_bytes(stage: Stage) -> None:
    """KMS is slow (the host controls the proxy): requests for a cold keyring wait, held as bytes, and a
    host that parks more than the enclave's budget loses the connection instead of its memory."""
    import aiohttp

    from enclave_worker.server import MAX_DEFERRED_BYTES

    assert stage.operator is not None
    key = await stage.operator.create_key("secp256k1", "kr")
    cold = 1 if key["enclave_id"] == "enc0" else 0
    big = {
        "types": {"EIP712Domain": [{"name": "name", "type": "string"}], "M": [{"name": "s", "type": "string"}]},
        "primaryType": "M",
        "domain": {"name": "x"},
        "message": {"s": "y" * 200_000},
    }
    before = enclave_rss_kib(stage.enclaves[cold])
    async with aiohttp.ClientSession() as s:
        await s.post(f"{stage.kms_url}/_dev/throttle", json={"next": 100_000})
    try:
        ch = await stage.channel(cold)
        sent = 0
        frames_sent = 0
        while sent <= MAX_DEFERRED_BYTES + 4 * 1024 * 1024:
            reqs = [
                {
                    "v": 1,
                    "request_id": f"p{frames_sent}-{i}",
                    "key_id": key["key_id"],
                    "scheme": "eth_typed_data",
                    "payload": big,
                }
                for i in range(8)
            ]
            body = _sign_frame(*reqs, corr=frames_sent * 10)
            sent += sum(len(raw) for _, raw in body["items"])
            frames_sent += 1
            try:
                await ch.send(body)
            except ConnectionError:
                break
        assert await ch.closed(timeout=20)
        assert enclave_rss_kib(stage.enclaves[cold]) - before < RSS_SLACK_KIB
    finally:
        async with aiohttp.ClientSession() as s:
            await s.post(f"{stage.kms_url}/_dev/throttle", json={"next": 0})
    await _serves(stage, cold)
