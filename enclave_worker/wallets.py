"""Wallet keys held inside the enclave process.

Keys are generated here and never leave this process. For now they live only
in memory (they do not survive a restart); the key-vault issue replaces this
with envelope-encrypted keyrings whose data keys KMS releases to an attested
image.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import coincurve
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from schemas.keccak import to_checksum_address

from .signers import eth_address


@dataclass(frozen=True, slots=True, repr=False)
class Wallet:
    key_id: str
    scheme: str  # "secp256k1" | "ed25519"
    private: Any  # coincurve.PrivateKey | Ed25519PrivateKey; never serialized, never logged
    public_key: bytes
    address: str | None = None

    def describe(self) -> dict[str, Any]:
        """What may leave the enclave about this key."""
        out: dict[str, Any] = {
            "key_id": self.key_id,
            "scheme": self.scheme,
            "public_key": self.public_key.hex(),
        }
        if self.address:
            out["address"] = self.address
        return out

    def __repr__(self) -> str:  # keep private material out of any accidental log line
        return f"Wallet(key_id={self.key_id!r}, scheme={self.scheme!r})"


class WalletStore:
    """The enclave's wallets by key_id."""

    def __init__(self) -> None:
        self._wallets: dict[str, Wallet] = {}

    def create(self, scheme: str) -> Wallet:
        key_id = "k_" + secrets.token_hex(10)
        if scheme == "secp256k1":
            priv = coincurve.PrivateKey()
            pub = priv.public_key.format(compressed=False)
            wallet = Wallet(key_id, scheme, priv, pub, to_checksum_address(eth_address(pub)))
        elif scheme == "ed25519":
            ed = Ed25519PrivateKey.generate()
            pub = ed.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            wallet = Wallet(key_id, scheme, ed, pub)
        else:
            raise ValueError(f"unknown key scheme {scheme!r}")
        self._wallets[key_id] = wallet
        return wallet

    def get(self, key_id: str) -> Wallet | None:
        return self._wallets.get(key_id)

    def list(self) -> list[Wallet]:
        return list(self._wallets.values())
