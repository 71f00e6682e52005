"""The wire contract: what an outside team builds with a dict and msgpack decodes, and what is refused."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import SchemaError, SignResult, decode_sign_request, decode_sign_result
from schemas.dlq import DlqRecord
from schemas.eth_tx import parse_eth_tx

DIGEST = bytes(range(32))
TX2 = {"type": 2, "chainId": 1, "nonce": 0, "to": "0x" + "11" * 20, "value": 1, "gas": 21000,
       "maxFeePerGas": 2 * 10**10, "maxPriorityFeePerGas": 10**9}  # fmt: skip


def req(**kw: object) -> bytes:
    m = {"v": 1, "request_id": "r-1", "key_id": "k_1", "scheme": "secp256k1_digest", "payload": DIGEST}
    m.update(kw)
    return msgpack.packb({k: v for k, v in m.items() if v is not ...})


def code_of(raw: bytes) -> str:
    with pytest.raises(SchemaError) as info:
        decode_sign_request(raw)
    return info.value.code


def test_plain_dict_from_an_outside_producer_decodes() -> None:
    r = decode_sign_request(req(deadline_ms=1_900_000_000_000, reply_topic="my.replies"))
    assert (r.request_id, r.key_id, r.scheme, r.payload) == ("r-1", "k_1", "secp256k1_digest", DIGEST)
    assert r.deadline_ms == 1_900_000_000_000 and r.reply_topic == "my.replies"


def test_unknown_top_level_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode_sign_request(req(trace_id="abc")).request_id == "r-1"


def test_eth_tx_with_hex_quantities_decodes() -> None:
    tx = {**TX2, "value": "0x" + "ff" * 20}
    r = decode_sign_request(req(scheme="eth_tx", payload=tx))
    assert parse_eth_tx(r.payload).value == int("ff" * 20, 16)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xc1", "malformed"),
        (msgpack.packb([1, 2]), "not_a_map"),
        (msgpack.packb({"v": 1}) + b"\x00", "malformed"),
        (b"\x81" * 10, "malformed"),
        (req(v=2), "unsupported_version"),
        (req(v=True), "wrong_type"),
        (req(v=...), "missing_field"),
        (req(request_id=...), "missing_field"),
        (req(request_id=""), "invalid_value"),
        (req(request_id="x" * 129), "invalid_value"),
        (req(request_id=5), "wrong_type"),
        (req(key_id=b"k"), "wrong_type"),
        (req(scheme="rsa"), "unknown_scheme"),
        (req(scheme=3), "wrong_type"),
        (req(payload=b"short"), "invalid_payload"),
        (req(payload="not bytes"), "wrong_type"),
        (req(deadline_ms="soon"), "wrong_type"),
        (req(deadline_ms=-1), "invalid_value"),
        (req(reply_topic="bad topic!"), "invalid_value"),
        (req(auth=[1]), "wrong_type"),
        (b"\x00" * (300 * 1024), "too_large"),
        (req(scheme="eth_personal", payload=b"x" * (65 * 1024)), "invalid_value"),
        (req(scheme="eth_typed_data", payload={"types": {}}), "invalid_payload"),
    ],
)
def test_malformed_requests_get_a_typed_code(raw: bytes, code: str) -> None:
    assert code_of(raw) == code


def test_error_names_the_request_when_it_got_that_far() -> None:
    with pytest.raises(SchemaError) as info:
        decode_sign_request(req(request_id="abc", scheme="nope"))
    assert info.value.request_id == "abc"


@pytest.mark.parametrize(
    "tx",
    [
        {k: v for k, v in TX2.items() if k != "chainId"},
        {**TX2, "chainId": 0},
        {**TX2, "maxFeePerGass": 1},
        {**TX2, "gasPrice": 1},
        {**TX2, "maxPriorityFeePerGas": 10**11},
        {**TX2, "type": 3},
        {**TX2, "to": "0x1234"},
        {**TX2, "to": "0x" + "aB" * 20},  # mixed case that fails EIP-55
        {**TX2, "value": -1},
        {**TX2, "value": "0x1" + "00" * 32},
        {**TX2, "nonce": True},
        {**TX2, "data": "0xabc"},
        {**TX2, "accessList": [{"address": "0x" + "22" * 20}]},
        {k: v for k, v in TX2.items() if k != "gas"},
        [1, 2],
    ],
)
def test_invalid_transactions_are_refused(tx: object) -> None:
    assert code_of(req(scheme="eth_tx", payload=tx)) in {"invalid_payload", "invalid_value", "wrong_type"}


def test_valid_eip55_address_is_accepted() -> None:
    from eth_utils import to_checksum_address

    addr = to_checksum_address("0x" + "ab" * 10 + "cd" * 10)
    assert parse_eth_tx({**TX2, "to": addr}).to == bytes.fromhex("ab" * 10 + "cd" * 10)


def test_type_is_inferred_as_eth_account_does() -> None:
    tx = {k: v for k, v in TX2.items() if k != "type"}
    assert parse_eth_tx(tx).type == 2
    legacy = {"chainId": 1, "nonce": 0, "gas": 21000, "gasPrice": 1, "to": "0x" + "11" * 20}
    assert parse_eth_tx(legacy).type == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_anything_but_schema_error(raw: bytes) -> None:
    try:
        decode_sign_request(raw)
    except SchemaError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "request_id", "key_id", "scheme", "payload", "deadline_ms", "reply_topic", "auth"]),
        st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=20), st.binary(max_size=40), st.booleans(), st.none(),
                  st.lists(st.integers(0, 2**32), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(0, 9), max_size=3)),
    )
)  # fmt: skip
def test_wrong_types_in_any_field_are_schema_errors(m: dict[str, object]) -> None:
    try:
        decode_sign_request(msgpack.packb(m))
    except SchemaError:
        pass


def test_result_and_dlq_round_trip() -> None:
    res = SignResult("r", "k", "ok", signature=b"s" * 65, enclave_id="e", timings_us={"enclave_service": 3})
    assert decode_sign_result(res.encode()) == res
    d = DlqRecord("malformed", "bad", "sign.requests", 3, 42, b"\xc1", b"k", None)
    assert DlqRecord.decode(d.encode()) == d


def test_the_inline_fast_path_decides_exactly_as_the_field_by_field_checks() -> None:
    """sign_request_from_map checks the common valid case inline and leaves everything else to the
    field-by-field path: for any map, both give the same request or the same refusal code."""
    from schemas.sign_request import _sign_request_checked, sign_request_from_map

    value = st.one_of(
        st.none(), st.booleans(), st.integers(-2, 2**65), st.floats(allow_nan=False), st.text(max_size=5),
        st.text(min_size=120, max_size=140), st.binary(max_size=40), st.just(b"\x01" * 32), st.just(1),
        st.sampled_from(["secp256k1_digest", "eth_personal", "ed25519", "eth_tx", "eth_typed_data", "rsa"]),
        st.just({}), st.just([1]), st.just("sign.replies"), st.just("bad topic!"),
    )  # fmt: skip
    fields = ["v", "request_id", "key_id", "scheme", "payload", "deadline_ms", "reply_topic", "auth", "extra"]

    def outcome(fn: Any, m: dict[str, Any]) -> Any:
        try:
            return ("ok", fn(m))
        except SchemaError as exc:
            return ("refused", exc.code, exc.request_id)

    @settings(max_examples=3000, deadline=None)
    @given(st.dictionaries(st.sampled_from(fields), value), st.booleans())
    def check(m: dict[str, Any], check_payload: bool) -> None:
        fast = outcome(lambda x: sign_request_from_map(x, _host_only_skip_payload=not check_payload), m)
        slow = outcome(lambda x: _sign_request_checked(x, check_payload), m)
        assert fast == slow, (m, fast, slow)

    check()


def test_the_enclave_never_skips_payload_checks() -> None:
    """decode_envelope (every field but the payload's shape) is the host's; the enclave's code never
    calls it nor passes the flag that skips the payload checks."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "enclave_worker"
    offenders = [
        str(path.relative_to(root.parent))
        for path in sorted(root.rglob("*.py"))
        if "decode_envelope" in (text := path.read_text()) or "_host_only_skip_payload" in text
    ]
    assert not offenders, offenders
