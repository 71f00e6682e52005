"""Signature schemes: secp256k1 (coincurve/libsecp256k1) for Ethereum, ed25519 (cryptography).

RFC 6979 makes ECDSA deterministic, so a replayed request yields the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import coincurve
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.eth_tx import EthTx
from schemas.keccak import keccak256

from . import rlp


@dataclass(frozen=True, slots=True)
class EthSigned:
    signature: bytes  # r || s || recovery id (0/1)
    raw_tx: bytes
    tx_hash: bytes


def sign_digest(key: coincurve.PrivateKey, digest: bytes) -> bytes:
    """65 bytes r || s || recovery id (0/1)."""
    return key.sign_recoverable(digest, hasher=None)


def personal_message_hash(message: bytes) -> bytes:
    return keccak256(b"\x19Ethereum Signed Message:\n" + str(len(message)).encode() + message)


def sign_personal(key: coincurve.PrivateKey, message: bytes) -> bytes:
    """EIP-191 version 0x45; v is 27/28 as eth-account returns it."""
    sig = sign_digest(key, personal_message_hash(message))
    return sig[:64] + bytes((sig[64] + 27,))


def _access_list(tx: EthTx) -> list[rlp.Item]:
    return [[addr, list(keys)] for addr, keys in tx.access_list]


def _unsigned_fields(tx: EthTx) -> list[rlp.Item]:
    if tx.type == 2:
        return [tx.chain_id, tx.nonce, tx.max_priority_fee_per_gas, tx.max_fee_per_gas,
                tx.gas, tx.to, tx.value, tx.data, _access_list(tx)]  # fmt: skip
    if tx.type == 1:
        return [tx.chain_id, tx.nonce, tx.gas_price, tx.gas, tx.to, tx.value, tx.data,
                _access_list(tx)]  # fmt: skip
    return [tx.nonce, tx.gas_price, tx.gas, tx.to, tx.value, tx.data]


def sign_eth_tx(key: coincurve.PrivateKey, tx: EthTx) -> EthSigned:
    """Legacy (EIP-155), EIP-2930 and EIP-1559 transactions."""
    fields = _unsigned_fields(tx)
    if tx.type == 0:
        sig = sign_digest(key, keccak256(rlp.encode([*fields, tx.chain_id, 0, 0])))
        v = sig[64] + 35 + 2 * tx.chain_id
        raw = rlp.encode([*fields, v, sig[:32].lstrip(b"\0"), sig[32:64].lstrip(b"\0")])
    else:
        prefix = bytes((tx.type,))
        sig = sign_digest(key, keccak256(prefix + rlp.encode(fields)))
        raw = prefix + rlp.encode([*fields, sig[64], sig[:32].lstrip(b"\0"), sig[32:64].lstrip(b"\0")])
    return EthSigned(sig, raw, keccak256(raw))


def sign_ed25519(key: Ed25519PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def eth_address(public_key_uncompressed: bytes) -> bytes:
    return keccak256(public_key_uncompressed[1:])[-20:]
