"""Signing cost per scheme (us/op), through the enclave's whole service path (decode, policy,
auth, sign) with a hot key, next to the raw coincurve signature - in one run."""

from __future__ import annotations

import os
import time
from typing import Any

import coincurve
import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_worker.auth import Authenticator
from enclave_worker.keyring import KeyringEnvelope, seal
from enclave_worker.service import SigningService
from enclave_worker.vault import Vault
from enclave_worker.wallets import new_secret, wallet_from_secret

TYPED = {
    "types": {
        "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "chainId", "type": "uint256"}],
        "Order": [
            {"name": "maker", "type": "address"},
            {"name": "amount", "type": "uint256"},
            {"name": "tags", "type": "string[]"},
        ],
    },
    "primaryType": "Order",
    "domain": {"name": "bench", "chainId": 1},
    "message": {"maker": "0x" + "ab" * 20, "amount": 10**18, "tags": ["a", "b"]},
}


def _vault_with_hot_keys() -> tuple[Vault, dict[str, str]]:
    vault = Vault.__new__(Vault)  # no KMS or attestation: the keys are made hot directly, for measuring only
    Vault.__init__(vault, kms=None, attestation=None)  # type: ignore[arg-type]
    dek = os.urandom(32)
    env = KeyringEnvelope("bench", "none", 1, b"", 0)
    aead = AESGCM(dek)
    keys = {}
    sealed = []
    for scheme in ("secp256k1", "ed25519"):
        secret = new_secret(scheme)
        w = wallet_from_secret(f"k_{scheme}", scheme, secret)
        sealed.append(seal(aead, w.key_id, env, scheme, w.public_key, w.address, secret, 0))
        keys[scheme] = w.key_id
    vault.load([env], sealed)
    vault.cache.put("bench", 1, dek)
    return vault, keys


def _requests(scheme: str, key_id: str, n: int) -> list[list[Any]]:
    payloads = {
        "secp256k1_digest": lambda i: os.urandom(32),
        "eth_personal": lambda i: f"message {i}".encode(),
        "ed25519": lambda i: f"message {i}".encode(),
        "eth_tx": lambda i: {
            "type": 2,
            "chainId": 1,
            "nonce": i,
            "to": "0x" + "11" * 20,
            "value": 10**16,
            "gas": 21000,
            "maxFeePerGas": 3 * 10**10,
            "maxPriorityFeePerGas": 10**9,
        },
        "eth_typed_data": lambda i: TYPED,
    }
    return [[i, msgpack.packb({"v": 1, "request_id": f"b{i}", "key_id": key_id, "scheme": scheme,
                               "payload": payloads[scheme](i)})] for i in range(n)]  # fmt: skip


def run_scheme_bench(n: int = 3000) -> dict[str, Any]:
    vault, keys = _vault_with_hot_keys()
    service = SigningService("bench", vault, Authenticator())
    priv = coincurve.PrivateKey()
    digests = [os.urandom(32) for _ in range(n)]
    t0 = time.perf_counter()
    for d in digests:
        priv.sign_recoverable(d, hasher=None)
    raw_us = (time.perf_counter() - t0) / n * 1e6
    out: dict[str, Any] = {"raw_coincurve_sign_us": round(raw_us, 1), "service_us_per_request": {}, "ratio_to_raw": {}}
    for scheme in ("secp256k1_digest", "eth_personal", "eth_tx", "eth_typed_data", "ed25519"):
        key = keys["ed25519" if scheme == "ed25519" else "secp256k1"]
        items = _requests(scheme, key, n)
        t0 = time.perf_counter()
        ready, deferred = service.sign_batch(items)
        us = (time.perf_counter() - t0) / n * 1e6
        assert not deferred and all(r[1]["status"] == "ok" for r in ready), ready[0]
        out["service_us_per_request"][scheme] = round(us, 1)
        out["ratio_to_raw"][scheme] = round(us / raw_us, 2)
    return out
