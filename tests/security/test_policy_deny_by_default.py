"""Key policies deny by default what they do not name: a hostile host asking for a scheme, or
an EIP-712 domain, that the policy's limits cannot be checked on gets `rejected`, never a
signature. KeyPolicy.check is called as the enclave calls it, on the raw (hostile) payload.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import coincurve
import msgpack
import pytest
from eth_account import Account
from eth_account.typed_transactions import TypedTransaction
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_worker import signers
from enclave_worker.policy import KeyPolicy, PolicyError, PolicyViolation, parse_policy
from schemas.eth_tx import parse_eth_tx
from schemas.sign_request import SCHEMES
from tests.unit.test_eip712 import MAIL

SECRET = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
ALLOWED_TO = "0x" + "11" * 20
FORBIDDEN_TO = "0x" + "66" * 20
CONTRACT = MAIL["domain"]["verifyingContract"]
OTHER_CONTRACT = to_checksum_address("0x" + "dd" * 20)
BAD_CHECKSUM = CONTRACT[:2] + CONTRACT[2].swapcase() + CONTRACT[3:]  # mixed case, EIP-55 fails
TX_LIMITS = [{"chain_ids": [1]}, {"to_allowlist": [ALLOWED_TO]}, {"max_value": 1000},
             {"chain_ids": [1], "to_allowlist": [ALLOWED_TO], "max_value": "0x3e8"}]  # fmt: skip
VALUE_LIMITS = [{"to_allowlist": [ALLOWED_TO]}, {"max_value": 1000}, {"chain_ids": [1], "max_value": 1000}]
# the documented rule: the schemes each limit can be checked on
APPLIES = {"chain_ids": {"eth_tx", "eth_typed_data"}, "to_allowlist": {"eth_tx"}, "max_value": {"eth_tx"},
           "typed_data_contracts": {"eth_typed_data"}}  # fmt: skip


def policy(raw: dict[str, Any]) -> KeyPolicy:
    p = parse_policy(raw)
    assert p is not None
    return p


def refusal(p: KeyPolicy, scheme: str, payload: Any, tx: Any = None) -> str | None:
    """The policy's refusal code for this request, None if it may be signed."""
    try:
        p.check(scheme, payload, tx)
    except PolicyViolation as exc:
        return exc.code
    return None


def tx_dict(**fields: Any) -> dict[str, Any]:
    tx = {"type": 2, "chainId": 1, "nonce": 7, "to": ALLOWED_TO, "value": 10, "gas": 21000,
          "maxFeePerGas": 3 * 10**10, "maxPriorityFeePerGas": 10**9, "data": b""}  # fmt: skip
    tx.update(fields)
    return tx


def typed(**domain: Any) -> dict[str, Any]:
    """MAIL with its domain's fields replaced (a value of None removes the field from domain and type)."""
    doc = copy.deepcopy(MAIL)
    for name, value in domain.items():
        if value is None:
            doc["domain"].pop(name, None)
            doc["types"]["EIP712Domain"] = [f for f in doc["types"]["EIP712Domain"] if f["name"] != name]
        else:
            doc["domain"][name] = value
    return doc


# -- raw digests, personal messages and ed25519 under transaction limits ---------------------------


@pytest.mark.parametrize("limits", TX_LIMITS)
@pytest.mark.parametrize("scheme", ["secp256k1_digest", "eth_personal", "ed25519"])
def test_a_scheme_no_limit_applies_to_is_refused_unless_named(limits: dict[str, Any], scheme: str) -> None:
    payload = os.urandom(32)
    assert refusal(policy(limits), scheme, payload) == "policy_scheme"
    listed = policy({**limits, "schemes": ["eth_tx", scheme]})  # naming it is a deliberate exemption
    assert refusal(listed, scheme, payload) is None


def test_the_signing_hash_of_a_forbidden_transaction_is_refused_as_a_digest() -> None:
    """The attack a raw digest carries: the signing hash of a transaction the policy forbids,
    signed as a digest, IS that transaction's signature."""
    p = policy({"to_allowlist": [ALLOWED_TO], "max_value": 10**18})
    forbidden = tx_dict(to=FORBIDDEN_TO, value=10**21)
    assert refusal(p, "eth_tx", forbidden, parse_eth_tx(forbidden)) == "policy_destination"

    reference = {**forbidden, "to": to_checksum_address(FORBIDDEN_TO)}
    signing_hash = TypedTransaction.from_dict(reference).hash()
    # why it matters: a signature of that digest is a valid signature of the forbidden transaction
    key = coincurve.PrivateKey(SECRET)
    sig = signers.sign_digest(key, signing_hash)
    signed = Account.sign_transaction(reference, SECRET)
    assert (int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"), sig[64]) == (
        signed.r,
        signed.s,
        signed.v,
    )
    assert refusal(p, "secp256k1_digest", signing_hash) == "policy_scheme"
    assert refusal(p, "eth_personal", signing_hash) == "policy_scheme"


def acceptable(scheme: str) -> tuple[Any, Any]:
    """A payload (and parsed form) of this scheme that every limit used here lets through."""
    if scheme == "eth_tx":
        return tx_dict(), parse_eth_tx(tx_dict())
    if scheme == "eth_typed_data":
        return typed(), None
    return os.urandom(32), None


def test_a_policy_without_limits_still_signs_every_scheme() -> None:
    p = policy({"require_auth": False})
    for scheme in SCHEMES:
        assert refusal(p, scheme, *acceptable(scheme)) is None


def test_an_eth_tx_is_checked_even_when_the_caller_passes_no_parsed_transaction() -> None:
    p = policy({"to_allowlist": [ALLOWED_TO]})
    assert refusal(p, "eth_tx", tx_dict(to=FORBIDDEN_TO), None) == "policy_destination"
    assert refusal(p, "eth_tx", tx_dict(), None) is None


# -- EIP-712 typed data ----------------------------------------------------------------------------


@pytest.mark.parametrize("limits", VALUE_LIMITS)
def test_typed_data_is_refused_under_value_limits_unless_named(limits: dict[str, Any]) -> None:
    assert refusal(policy(limits), "eth_typed_data", typed(chainId=1)) == "policy_scheme"
    listed = policy({**limits, "schemes": ["eth_tx", "eth_typed_data"]})
    assert refusal(listed, "eth_typed_data", typed(chainId=1)) is None


def test_typed_data_under_chain_ids_alone_is_signed_for_an_allowed_chain() -> None:
    p = policy({"chain_ids": [1, 10]})
    assert refusal(p, "eth_typed_data", typed(chainId=10)) is None
    assert refusal(p, "eth_typed_data", typed(chainId=5)) == "policy_chain_id"


NOT_AN_INTEGER_CHAIN = [None, "1", "0x1", " 1", "1_0", "01", True, False, -1, 2**300, 1.0, b"\x01", [1], {"id": 1}]


@pytest.mark.parametrize("chain", NOT_AN_INTEGER_CHAIN, ids=repr)
def test_chain_ids_refuses_a_domain_without_an_integer_chain_id(chain: Any) -> None:
    p = policy({"schemes": ["eth_typed_data"], "chain_ids": [1, 10]})
    assert refusal(p, "eth_typed_data", typed(chainId=chain)) == "policy_chain_id"


@pytest.mark.parametrize("declared", ["uint8", "string", "int256", "bytes32", "uint", "Mail"])
def test_chain_ids_refuses_a_chain_id_not_declared_uint256(declared: str) -> None:
    doc = typed(chainId=1)
    for f in doc["types"]["EIP712Domain"]:
        if f["name"] == "chainId":
            f["type"] = declared
    assert refusal(policy({"chain_ids": [1]}), "eth_typed_data", doc) == "policy_chain_id"


def test_an_undeclared_domain_chain_id_is_not_taken_for_a_signed_one() -> None:
    """A chainId in the domain map that EIP712Domain does not declare would not be in the digest."""
    doc = typed(chainId=None)
    doc["domain"]["chainId"] = 1
    assert refusal(policy({"chain_ids": [1]}), "eth_typed_data", doc) == "policy_chain_id"


def test_a_domain_derived_from_its_fields_is_checked_the_same() -> None:
    doc = typed(chainId=1)
    del doc["types"]["EIP712Domain"]  # the digest derives it from the domain's fields
    assert refusal(policy({"chain_ids": [1]}), "eth_typed_data", doc) is None
    doc["domain"]["chainId"] = "0x1"
    assert refusal(policy({"chain_ids": [1]}), "eth_typed_data", doc) == "policy_chain_id"


def test_typed_data_contracts_is_an_allow_list_of_verifying_contracts() -> None:
    p = policy({"typed_data_contracts": [CONTRACT]})
    assert refusal(p, "eth_typed_data", typed()) is None
    assert refusal(p, "eth_typed_data", typed(verifyingContract=CONTRACT.lower())) is None
    assert refusal(p, "eth_typed_data", typed(verifyingContract=bytes.fromhex(CONTRACT[2:]))) is None
    assert refusal(p, "eth_typed_data", typed(verifyingContract=OTHER_CONTRACT)) == "policy_verifying_contract"
    assert refusal(p, "eth_typed_data", typed(verifyingContract=None)) == "policy_verifying_contract"
    for bad in ("0x" + "cc" * 19, "0x" + "cc" * 21, BAD_CHECKSUM, "cc" * 20, 12, True, b"\xcc" * 21):
        assert refusal(p, "eth_typed_data", typed(verifyingContract=bad)) == "policy_verifying_contract", bad
    # limits the contract, not the other schemes' use: they need naming
    assert refusal(p, "secp256k1_digest", os.urandom(32)) == "policy_scheme"
    assert refusal(p, "eth_tx", tx_dict(), parse_eth_tx(tx_dict())) == "policy_scheme"


def test_an_undeclared_or_mistyped_verifying_contract_is_refused() -> None:
    p = policy({"typed_data_contracts": [CONTRACT]})
    doc = typed(verifyingContract=None)
    doc["domain"]["verifyingContract"] = CONTRACT  # present, but not part of the signed domain
    assert refusal(p, "eth_typed_data", doc) == "policy_verifying_contract"
    doc = typed()
    doc["types"]["EIP712Domain"][3]["type"] = "bytes20"
    assert refusal(p, "eth_typed_data", doc) == "policy_verifying_contract"


def test_both_domain_limits_together() -> None:
    p = policy({"schemes": ["eth_tx", "eth_typed_data"], "chain_ids": [1], "typed_data_contracts": [CONTRACT],
                "to_allowlist": [ALLOWED_TO], "max_value": 1000})  # fmt: skip
    assert refusal(p, "eth_typed_data", typed()) is None
    assert refusal(p, "eth_typed_data", typed(chainId=10)) == "policy_chain_id"
    assert refusal(p, "eth_typed_data", typed(verifyingContract=OTHER_CONTRACT)) == "policy_verifying_contract"
    assert refusal(p, "eth_tx", tx_dict(value=1001), parse_eth_tx(tx_dict(value=1001))) == "policy_value_cap"


@pytest.mark.parametrize(
    "raw",
    [
        {"typed_data_contracts": [CONTRACT], "schemes": ["eth_tx"]},  # it limits a scheme the key never signs
        {"typed_data_contracts": [CONTRACT], "max_value": 1},  # typed data needs naming under a value limit
        {"typed_data_contracts": ["0x1234"]},
        {"typed_data_contracts": "0x" + "cc" * 20},
        {"typed_data_contracts": [CONTRACT] * 1025},
        {"to_allowlist": ["0x" + "1 " * 20]},
        {"schemes": [{"eth_tx": 1}]},
        {"chain_ids": [1] * 1025},
        {"max_value": "0x" + "f" * 65},
    ],
)
def test_inconsistent_or_malformed_policies_are_refused_at_creation(raw: dict[str, Any]) -> None:
    with pytest.raises(PolicyError):
        parse_policy(raw)


def test_check_reads_the_domain_only_and_before_any_digest() -> None:
    """A refused domain is refused whatever the rest of the document holds (the enclave never parses it)."""
    doc = typed(chainId=5)
    doc["types"]["Mail"] = [{"name": f"f{i}", "type": "Mail[]"} for i in range(5000)]  # far over every cap
    doc["message"] = {"junk": [[[]]] * 10_000}
    assert refusal(policy({"chain_ids": [1]}), "eth_typed_data", doc) == "policy_chain_id"


# -- the rule, for every combination of limits ---------------------------------------------------

limit_values = {"chain_ids": [1], "to_allowlist": [ALLOWED_TO], "max_value": 1000, "typed_data_contracts": [CONTRACT]}


@settings(max_examples=300, deadline=None)
@given(st.sets(st.sampled_from(sorted(APPLIES))), st.sampled_from(SCHEMES))
def test_without_schemes_a_scheme_is_signed_only_if_every_limit_applies_to_it(limits: set[str], scheme: str) -> None:
    raw = {name: limit_values[name] for name in limits}
    try:
        p = policy(raw)
    except PolicyError:
        # typed_data_contracts with a limit typed data cannot be checked on: refused as contradictory
        assert "typed_data_contracts" in limits and limits & {"to_allowlist", "max_value"}
        return
    expected = all(scheme in APPLIES[name] for name in limits)
    assert refusal(p, scheme, *acceptable(scheme)) == (None if expected else "policy_scheme")


hostile_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**300), st.text(max_size=50), st.binary(max_size=40),
              st.floats(allow_nan=True)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=20), inner, max_size=4)),
    max_leaves=20,
)  # fmt: skip
domain_keys = st.sampled_from(["name", "version", "chainId", "verifyingContract", "salt", "other"])


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(domain_keys, hostile_values, max_size=3),
    st.sets(domain_keys),
    st.one_of(st.none(), hostile_values,
              st.lists(st.fixed_dictionaries({"name": domain_keys, "type": hostile_values}), max_size=6)),
)  # fmt: skip
def test_hostile_domains_are_refused_or_exactly_checked(changes: dict[str, Any], removed: set[str],
                                                        declared: Any) -> None:  # fmt: skip
    """Whatever the host sends, check raises PolicyViolation, or lets through only a domain whose
    declared uint256 chainId is the int 1 and whose declared address is the allowed contract."""
    domain = {k: v for k, v in {**MAIL["domain"], **changes}.items() if k not in removed}
    types: dict[str, Any] = {"Mail": MAIL["types"]["Mail"]}
    if declared is not None:
        types["EIP712Domain"] = declared
    doc: dict[str, Any] = {"types": types, "primaryType": "Mail", "domain": domain, "message": MAIL["message"]}
    if _packable(doc):  # as the enclave gets it: through msgpack
        doc = msgpack.unpackb(msgpack.packb(doc), strict_map_key=False)
    p = policy({"chain_ids": [1], "typed_data_contracts": [CONTRACT]})
    if refusal(p, "eth_typed_data", doc) is None:
        declared_types = (
            {f["name"]: f["type"] for f in doc["types"]["EIP712Domain"]}
            if "EIP712Domain" in doc["types"]
            else {"chainId": "uint256", "verifyingContract": "address"}
        )
        assert declared_types["chainId"] == "uint256" and declared_types["verifyingContract"] == "address"
        assert type(doc["domain"]["chainId"]) is int and doc["domain"]["chainId"] == 1
        contract = doc["domain"]["verifyingContract"]
        assert (bytes.fromhex(contract[2:]) if type(contract) is str else contract) == bytes.fromhex(CONTRACT[2:])


def _packable(doc: Any) -> bool:
    try:
        msgpack.packb(doc)
    except (OverflowError, TypeError, ValueError):
        return False
    return True
