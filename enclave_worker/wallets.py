"""Wallet keys as the enclave holds them once opened: a key object that can sign.

Secrets exist in clear only inside the enclave process, only as long as the
keyring's data key is cached; they are never serialized except sealed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import coincurve
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from schemas.keccak import to_checksum_address

from .signers import eth_address

KEY_SCHEMES = ("secp256k1", "ed25519")


@dataclass(frozen=True, slots=True, repr=False)
class Wallet:
    key_id: str
    scheme: str  # "secp256k1" | "ed25519"
    private: Any  # coincurve.PrivateKey | Ed25519PrivateKey; never serialized, never logged
    public_key: bytes
    address: str | None = None

    def __repr__(self) -> str:  # keep private material out of any accidental log line
        return f"Wallet(key_id={self.key_id!r}, scheme={self.scheme!r})"


def wallet_from_secret(key_id: str, scheme: str, secret: bytes) -> Wallet:
    """Build a wallet from its 32-byte secret; ValueError if it is not a valid key."""
    if len(secret) != 32:
        raise ValueError("a private key is 32 bytes")
    if scheme == "secp256k1":
        priv = coincurve.PrivateKey(secret)  # raises ValueError outside the curve order
        pub = priv.public_key.format(compressed=False)
        return Wallet(key_id, scheme, priv, pub, to_checksum_address(eth_address(pub)))
    if scheme == "ed25519":
        ed = Ed25519PrivateKey.from_private_bytes(secret)
        return Wallet(key_id, scheme, ed, ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    raise ValueError(f"unknown key scheme {scheme!r}, expected one of {KEY_SCHEMES}")


def new_secret(scheme: str) -> bytes:
    if scheme == "secp256k1":
        return bytes(coincurve.PrivateKey().secret)
    if scheme == "ed25519":
        return Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    raise ValueError(f"unknown key scheme {scheme!r}, expected one of {KEY_SCHEMES}")
