"""The enclave's signing service: a batch of requests in, batches of results out.

The enclave trusts nothing from the host: each request is decoded and validated
here again, deadlines are re-checked, and a key signs only the schemes of its type.

Requests whose keyring data key is cached are signed at once (the fast path, no
await). The others are deferred: their keyrings are unwrapped through KMS (one
call per keyring, shared by every request that needs it) and they are signed
when it arrives, or expire if their deadline passes first.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from schemas.errors import SchemaError
from schemas.eth_tx import EthTx, parse_eth_tx
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
from .auth import Authenticator, AuthFailure
from .eip712 import TypedDataError, typed_data_digest
from .policy import PolicyError, PolicyViolation
from .vault import Vault, VaultError
from .wallets import Wallet

_KEY_SCHEMES = {
    "secp256k1_digest": "secp256k1",
    "eth_tx": "secp256k1",
    "eth_personal": "secp256k1",
    "eth_typed_data": "secp256k1",
    "ed25519": "ed25519",
}


@dataclass(slots=True)
class Prepared:
    """A request that passed validation, policy and authentication, ready for its key."""

    req: SignRequest
    tx: EthTx | None = None
    typed_digest: bytes | None = None
    auth_entry: Any = None  # the replay-cache entry to record the result in


@dataclass(slots=True)
class Deferred:
    corr_id: int
    prepared: Prepared
    t0_ns: int
    deadline: float  # monotonic

    @property
    def req(self) -> SignRequest:
        return self.prepared.req


class SigningService:
    def __init__(self, enclave_id: str, vault: Vault, auth: Authenticator | None = None) -> None:
        self.enclave_id = enclave_id
        self.vault = vault
        self.auth = auth or Authenticator()

    def sign_batch(self, items: list[Any]) -> tuple[list[list[Any]], list[Deferred]]:
        """items: [[corr_id, SignRequest bytes], ...] -> (results now, requests waiting for a keyring)."""
        ready: list[list[Any]] = []
        deferred: list[Deferred] = []
        now_ms = int(time.time() * 1000)
        mono = time.monotonic()
        for corr_id, raw in items:
            t0 = time.perf_counter_ns()
            try:
                outcome = self._sign_hot(raw, now_ms)
                if isinstance(outcome, Prepared):
                    req = outcome.req
                    if req.deadline_ms is not None:
                        deadline = mono + (req.deadline_ms - now_ms) / 1000
                    else:
                        deadline = mono + self.vault.settings.unwrap_timeout_s
                    deferred.append(Deferred(corr_id, outcome, t0, deadline))
                    continue
                if isinstance(outcome, dict):  # signed now (or a redelivery's first result)
                    ready.append([corr_id, outcome])
                    continue
                result = outcome
            except Exception as exc:  # one bad item never takes down the batch or the loop
                result = SignResult.failure("", "", "error", INTERNAL, f"enclave failed: {type(exc).__name__}")
            ready.append([corr_id, self._finish(result, t0)])
        return ready, deferred

    def _finish(self, result: SignResult, t0_ns: int, prepared: Prepared | None = None) -> dict[str, Any]:
        result.enclave_id = self.enclave_id
        result.timings_us["enclave_service"] = (time.perf_counter_ns() - t0_ns) // 1000
        wire = result.to_wire()
        if prepared is not None and prepared.auth_entry is not None and result.status != "expired":
            prepared.auth_entry.result = wire  # a redelivery of this request gets these same bytes
        return wire

    def _prepare(self, raw: Any, now_ms: int) -> SignResult | Prepared | dict[str, Any]:
        """Decode, check deadline, key, scheme, policy and authentication; no key is opened yet."""
        try:
            req = decode_sign_request(raw)
        except SchemaError as exc:
            return SignResult.failure(exc.request_id or "", "", "error", exc.code, exc.message)
        if req.deadline_ms is not None and req.deadline_ms <= now_ms:
            return _expired(req)
        sealed = self.vault.sealed.get(req.key_id)
        if sealed is None:
            return SignResult.failure(req.request_id, req.key_id, "error", UNKNOWN_KEY, "no such key in this enclave")
        if _KEY_SCHEMES[req.scheme] != sealed.scheme:
            return SignResult.failure(
                req.request_id,
                req.key_id,
                "rejected",
                SCHEME_MISMATCH,
                f"a {sealed.scheme} key cannot sign {req.scheme}",
            )
        prepared = Prepared(req)
        try:
            policy = self.vault.policy(req.key_id)
            if req.scheme == "eth_tx":
                prepared.tx = req.parsed or parse_eth_tx(req.payload, req.request_id)
            elif req.scheme == "eth_typed_data":
                prepared.typed_digest = typed_data_digest(req.payload)
            if policy is not None:
                policy.check(req.scheme, req.payload, prepared.tx)
            prepared.auth_entry = self.auth.verify(req, policy)
        except PolicyError as exc:
            return SignResult.failure(req.request_id, req.key_id, "error", "invalid_policy", str(exc))
        except (PolicyViolation, AuthFailure) as exc:
            return SignResult.failure(req.request_id, req.key_id, "rejected", exc.code, exc.message)
        except TypedDataError as exc:
            status = "error" if exc.code == "invalid_typed_data" else "rejected"
            return SignResult.failure(req.request_id, req.key_id, status, exc.code, exc.message)
        if prepared.auth_entry is not None and prepared.auth_entry.result is not None:
            return dict(prepared.auth_entry.result)  # a redelivery: the same result as the first time
        return prepared

    def _sign_hot(self, raw: Any, now_ms: int) -> SignResult | Prepared | dict[str, Any]:
        t0 = time.perf_counter_ns()
        outcome = self._prepare(raw, now_ms)
        if not isinstance(outcome, Prepared):
            return outcome
        req = outcome.req
        try:
            wallet = self.vault.hot_wallet(req.key_id)
        except VaultError as exc:
            return SignResult.failure(req.request_id, req.key_id, exc.status, exc.code, exc.message)
        if wallet is None:
            return outcome  # its keyring must be unwrapped first
        return self._finish(self._sign(outcome, wallet), t0, outcome)

    async def sign_deferred(self, deferred: list[Deferred]) -> list[list[Any]]:
        """Unwrap each needed keyring once (concurrently), then sign or expire each request."""
        groups: dict[tuple[str, int], list[Deferred]] = {}
        for d in deferred:
            sealed = self.vault.sealed[d.prepared.req.key_id]
            groups.setdefault((sealed.keyring_id, sealed.dek_version), []).append(d)
        slots = list(groups)
        outcomes = await asyncio.gather(
            *(self.vault.data_key(kr, v, max(d.deadline for d in groups[(kr, v)])) for kr, v in slots),
            return_exceptions=True,
        )
        failures = {slot: o for slot, o in zip(slots, outcomes, strict=True) if isinstance(o, BaseException)}
        out: list[list[Any]] = []
        now_ms = int(time.time() * 1000)
        for slot, items in groups.items():
            for d in items:
                failure = failures.get(slot)
                try:
                    if d.req.deadline_ms is not None and d.req.deadline_ms <= now_ms:
                        result = _expired(d.req)
                    elif isinstance(failure, VaultError):
                        result = SignResult.failure(d.req.request_id, d.req.key_id, failure.status, failure.code,
                                                    failure.message)  # fmt: skip
                    elif failure is not None:
                        result = SignResult.failure(d.req.request_id, d.req.key_id, "error", INTERNAL,
                                                    f"enclave failed: {type(failure).__name__}")  # fmt: skip
                    else:
                        wallet = self.vault.hot_wallet(d.req.key_id) or await self.vault.wallet(
                            d.req.key_id, d.deadline
                        )
                        result = self._sign(d.prepared, wallet)
                except VaultError as exc:
                    result = SignResult.failure(d.req.request_id, d.req.key_id, exc.status, exc.code, exc.message)
                except Exception as exc:
                    result = SignResult.failure(d.req.request_id, d.req.key_id, "error", INTERNAL,
                                                f"enclave failed: {type(exc).__name__}")  # fmt: skip
                result.timings_us["kms_wait"] = (time.perf_counter_ns() - d.t0_ns) // 1000
                out.append([d.corr_id, self._finish(result, d.t0_ns, d.prepared)])
        return out

    def _sign(self, prepared: Prepared, wallet: Wallet) -> SignResult:
        req = prepared.req
        ok = SignResult(req.request_id, req.key_id, "ok")
        if req.scheme == "secp256k1_digest":
            ok.signature = signers.sign_digest(wallet.private, req.payload)
        elif req.scheme == "eth_personal":
            ok.signature = signers.sign_personal(wallet.private, req.payload)
        elif req.scheme == "eth_typed_data":
            assert prepared.typed_digest is not None
            sig = signers.sign_digest(wallet.private, prepared.typed_digest)
            ok.signature = sig[:64] + bytes((sig[64] + 27,))
        elif req.scheme == "eth_tx":
            tx = prepared.tx or parse_eth_tx(req.payload, req.request_id)
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


def _expired(req: SignRequest) -> SignResult:
    return SignResult.failure(req.request_id, req.key_id, "expired", DEADLINE_PASSED, "deadline passed before signing")
