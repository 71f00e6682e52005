"""Signing correctness, proven against reference libraries (eth-account, cryptography)."""

from __future__ import annotations

import os

import coincurve
import pytest
import rlp as pyrlp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import to_checksum_address as ref_checksum
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_worker import rlp, signers
from schemas.eth_tx import parse_eth_tx
from schemas.keccak import keccak256, to_checksum_address

SECRET = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
KEY = coincurve.PrivateKey(SECRET)
ACCT = Account.from_key(SECRET)


def test_keccak_is_ethereums_keccak() -> None:
    assert keccak256(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_keccak_matches_eth_hash(data: bytes) -> None:
    from eth_utils import keccak

    assert keccak256(data) == keccak(data)


@settings(max_examples=100)
@given(st.binary(min_size=20, max_size=20))
def test_checksum_address_matches_eth_utils(addr: bytes) -> None:
    assert to_checksum_address(addr) == ref_checksum(addr)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=80), st.integers(min_value=0, max_value=2**256),
                 st.recursive(st.binary(max_size=60), lambda c: st.lists(c, max_size=5), max_leaves=12)))  # fmt: skip
def test_rlp_matches_pyrlp(item: object) -> None:
    assert rlp.encode(item) == pyrlp.encode(item)  # type: ignore[arg-type]


def test_digest_signature_recovers_to_the_key() -> None:
    digest = os.urandom(32)
    sig = signers.sign_digest(KEY, digest)
    assert len(sig) == 65 and sig[64] in (0, 1)
    vrs = (sig[64] + 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
    assert Account._recover_hash(digest, vrs=vrs) == ACCT.address
    # deterministic (RFC 6979): same bytes as eth-account's own signature of the hash
    ref = Account.unsafe_sign_hash(digest, SECRET)
    assert sig[:64] == ref.signature[:64]


def test_personal_message_matches_eth_account() -> None:
    msg = b"hello enclave"
    ref = Account.sign_message(encode_defunct(msg), SECRET)
    assert signers.sign_personal(KEY, msg) == bytes(ref.signature)


def test_ed25519_verifies_with_cryptography() -> None:
    k = Ed25519PrivateKey.generate()
    sig = signers.sign_ed25519(k, b"m")
    k.public_key().verify(sig, b"m")  # raises if wrong
    assert len(sig) == 64


addresses = st.binary(min_size=20, max_size=20)
quantity = st.integers(min_value=0, max_value=2**256 - 1)
small = st.integers(min_value=0, max_value=2**64 - 1)
access_lists = st.lists(
    st.fixed_dictionaries({"address": addresses.map(lambda b: "0x" + b.hex()),
                           "storageKeys": st.lists(st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex()), max_size=3)}),
    max_size=3,
)  # fmt: skip


@st.composite
def transactions(draw: st.DrawFn) -> dict[str, object]:
    tx_type = draw(st.sampled_from([0, 1, 2]))
    tx: dict[str, object] = {
        "type": tx_type,
        "chainId": draw(st.integers(min_value=1, max_value=2**32)),
        "nonce": draw(small),
        "gas": draw(st.integers(min_value=21000, max_value=30_000_000)),
        "value": draw(quantity),
        "data": draw(st.binary(max_size=200)),
    }
    if draw(st.booleans()):
        tx["to"] = "0x" + draw(addresses).hex()
    if tx_type == 2:
        max_fee = draw(small)
        tx["maxFeePerGas"] = max_fee
        tx["maxPriorityFeePerGas"] = draw(st.integers(min_value=0, max_value=max_fee))
    else:
        tx["gasPrice"] = draw(small)
    if tx_type in (1, 2):
        tx["accessList"] = draw(access_lists)
    return tx


def _as_eth_account(tx: dict[str, object]) -> dict[str, object]:
    ref = dict(tx)
    if "to" in ref:
        ref["to"] = ref_checksum(ref["to"])  # type: ignore[arg-type]
    if ref["type"] == 0:
        del ref["type"]
    return ref


@settings(max_examples=2000, deadline=None)
@given(transactions())
def test_transactions_match_eth_account_byte_for_byte(tx: dict[str, object]) -> None:
    ours = signers.sign_eth_tx(KEY, parse_eth_tx(tx))
    ref = Account.sign_transaction(_as_eth_account(tx), SECRET)
    assert ours.raw_tx == bytes(ref.raw_transaction)
    assert ours.tx_hash == bytes(ref.hash)
    assert Account.recover_transaction(ours.raw_tx) == ACCT.address


@pytest.mark.parametrize("tx_type", [0, 1, 2])
def test_contract_creation_has_empty_to(tx_type: int) -> None:
    tx: dict[str, object] = {"type": tx_type, "chainId": 5, "nonce": 1, "gas": 100000, "value": 0,
                             "data": b"\x60\x00"}  # fmt: skip
    if tx_type == 2:
        tx.update(maxFeePerGas=10, maxPriorityFeePerGas=1)
    else:
        tx["gasPrice"] = 10
    ours = signers.sign_eth_tx(KEY, parse_eth_tx(tx))
    assert ours.raw_tx == bytes(Account.sign_transaction(_as_eth_account(tx), SECRET).raw_transaction)
