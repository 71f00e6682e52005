"""The enclave's signing service: a batch of requests in, a batch of results out.

The enclave trusts nothing from the host: each request is re-validated here
with the same strict decoder the host used, deadlines are re-checked, and a
key is used only for the schemes of its type.
"""

from __future__ import annotations

import time
from typing import Any

from schemas.errors import SchemaError
from schemas.eth_tx import parse_eth_tx
from schemas.sign_request import SignRequest, decode_sign_request
from schemas.sign_result import (
    DEADLINE_PASSED,
    INTERNAL,
    SCHEME_MISMATCH,
    SENDER_MISMATCH,
    UNKNOWN_KEY,
    UNSUPPORTED_SCHEME,
    SignResult,
)

from . import signers
from .wallets import Wallet, WalletStore

_KEY_SCHEMES = {
    "secp256k1_digest": "secp256k1",
    "eth_tx": "secp256k1",
    "eth_personal": "secp256k1",
    "eth_typed_data": "secp256k1",
    "ed25519": "ed25519",
}


class SigningService:
    def __init__(self, enclave_id: str, wallets: WalletStore) -> None:
        self.enclave_id = enclave_id
        self.wallets = wallets

    def sign_batch(self, items: list[Any]) -> list[list[Any]]:
        """items: [[corr_id, SignRequest bytes], ...] -> [[corr_id, SignResult map], ...]."""
        out: list[list[Any]] = []
        now_ms = int(time.time() * 1000)
        for item in items:
            t0 = time.perf_counter_ns()
            corr_id, raw = item
            try:
                result = self._sign_one(raw, now_ms)
            except Exception as exc:  # one bad item never takes down the batch or the loop
                result = SignResult.failure("", "", "error", INTERNAL, f"enclave failed: {type(exc).__name__}")
            result.enclave_id = self.enclave_id
            result.timings_us["enclave_service"] = (time.perf_counter_ns() - t0) // 1000
            out.append([corr_id, result.to_wire()])
        return out

    def _sign_one(self, raw: Any, now_ms: int) -> SignResult:
        try:
            req = decode_sign_request(raw)
        except SchemaError as exc:
            return SignResult.failure(exc.request_id or "", "", "error", exc.code, exc.message)
        if req.deadline_ms is not None and req.deadline_ms <= now_ms:
            return SignResult.failure(
                req.request_id, req.key_id, "expired", DEADLINE_PASSED, "deadline passed before signing"
            )
        wallet = self.wallets.get(req.key_id)
        if wallet is None:
            return SignResult.failure(req.request_id, req.key_id, "error", UNKNOWN_KEY, "no such key in this enclave")
        if _KEY_SCHEMES[req.scheme] != wallet.scheme:
            return SignResult.failure(
                req.request_id, req.key_id, "rejected", SCHEME_MISMATCH,
                f"a {wallet.scheme} key cannot sign {req.scheme}",
            )  # fmt: skip
        return self._sign(req, wallet)

    def _sign(self, req: SignRequest, wallet: Wallet) -> SignResult:
        ok = SignResult(req.request_id, req.key_id, "ok")
        if req.scheme == "secp256k1_digest":
            ok.signature = signers.sign_digest(wallet.private, req.payload)
        elif req.scheme == "eth_personal":
            ok.signature = signers.sign_personal(wallet.private, req.payload)
        elif req.scheme == "eth_tx":
            tx = parse_eth_tx(req.payload, req.request_id)
            if tx.sender is not None and "0x" + tx.sender.hex() != (wallet.address or "").lower():
                return SignResult.failure(
                    req.request_id, req.key_id, "rejected", SENDER_MISMATCH,
                    "the transaction's 'from' is not this key's address",
                )  # fmt: skip
            signed = signers.sign_eth_tx(wallet.private, tx)
            ok.signature, ok.raw_tx, ok.tx_hash = signed.signature, signed.raw_tx, signed.tx_hash
        elif req.scheme == "ed25519":
            ok.signature = signers.sign_ed25519(wallet.private, req.payload)
        else:
            return SignResult.failure(
                req.request_id, req.key_id, "error", UNSUPPORTED_SCHEME,
                f"{req.scheme} is not implemented by this enclave version",
            )  # fmt: skip
        return ok
