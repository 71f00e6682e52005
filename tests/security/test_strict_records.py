"""Records from the host's key store are decoded strictly: exact types, bounded sizes, no coercion
(`bytes(10**9)` once allocated a gigabyte inside the enclave from a 300-byte frame)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_worker.keyring import seal
from schemas.records import KeyringEnvelope, RecordError, SealedKey

ENV = KeyringEnvelope("kr", "arn:aws:kms:us-east-1:000000000000:key/k", 1, b"blob", 0)
SEALED = seal(AESGCM(bytes(32)), "k_01", ENV, "secp256k1", b"\x04" + b"p" * 64, "0x" + "ab" * 20, b"s" * 32, 0,
              {"schemes": ["eth_tx"]})  # fmt: skip

BAD_ENVELOPES: list[dict[str, Any]] = [
    {"encrypted_dek": 1_500_000_000}, {"encrypted_dek": b""}, {"encrypted_dek": b"x" * 10_000},
    {"dek_version": "1"}, {"dek_version": True}, {"dek_version": 0}, {"dek_version": 2**40},
    {"keyring_id": "../etc"}, {"keyring_id": 5}, {"kms_key_id": b"arn"}, {"created_ms": -1},
    {"surprise": 1}, {"v": 2},
]  # fmt: skip
BAD_KEYS: list[dict[str, Any]] = [
    {"ciphertext": 10**9}, {"public_key": 65}, {"nonce": b"short"}, {"scheme": "rsa"}, {"address": 7},
    {"policy": "all"}, {"policy": {"a": [[[[[[[[[1]]]]]]]]]}}, {"key_id": ""}, {"key_id": "k" * 65},
    {"dek_version": 1.0},
]  # fmt: skip


@pytest.mark.parametrize("change", BAD_ENVELOPES, ids=str)
def test_a_malformed_envelope_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        KeyringEnvelope.from_wire({**ENV.to_wire(), **change})


@pytest.mark.parametrize("change", BAD_KEYS, ids=str)
def test_a_malformed_sealed_key_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        SealedKey.from_wire({**SEALED.to_wire(), **change})


def test_well_formed_records_round_trip() -> None:
    assert KeyringEnvelope.from_wire(ENV.to_wire()) == ENV
    assert SealedKey.from_wire(SEALED.to_wire()) == SEALED
    for not_a_map in (None, [], "x", 5):
        with pytest.raises(RecordError):
            SealedKey.from_wire(not_a_map)
