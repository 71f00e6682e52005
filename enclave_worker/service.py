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
from schemas.refusals import Code, Refused
from schemas.sign_request import MAX_REQUEST_BYTES, SignRequest, sign_request_from_map, unpack_map
from schemas.sign_result import SignResult

from . import signers
from .auth import Authenticator
from .eip712 import typed_data_digest
from .vault import OpenedKey, Vault
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
    """A decoded request, not yet checked against its key (which is not opened yet)."""

    req: SignRequest
    tx: EthTx | None = None
    typed_digest: bytes | None = None
    auth_entry: Any = None  # the replay-cache entry to record the result in


@dataclass(slots=True)
class Deferred:
    """A request waiting for its keyring: kept as the bytes it came in (decoded objects can be
    tens of times larger) and decoded again once the keyring is open."""

    corr_id: int
    raw: bytes
    key_id: str
    t0_ns: int
    deadline: float  # monotonic


class SigningService:
    """Signs with keys the vault has just authenticated: a request's scheme, policy and auth are
    checked against the opened key (never against the host's copy of its record), and that same
    key signs. The EIP-712 digest is computed only after every check has passed."""

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
        cap = self.vault.settings.unwrap_timeout_s
        for corr_id, raw in items:
            t0 = time.perf_counter_ns()
            prepared: Prepared | None = None
            try:
                outcome: SignResult | Prepared | dict[str, Any] = self._prepare(raw, now_ms)
                if isinstance(outcome, Prepared):
                    prepared = outcome
                    key = self.vault.hot_key(prepared.req.key_id)
                    if key is None:  # its keyring must be unwrapped first
                        req = prepared.req
                        # a deadline is capped at now + the unwrap timeout: a host cannot park work here
                        wait = cap if req.deadline_ms is None else min(cap, (req.deadline_ms - now_ms) / 1000)
                        deferred.append(Deferred(corr_id, raw, req.key_id, t0, mono + wait))
                        continue
                    outcome = self._sign_with(prepared, key)
                if isinstance(outcome, dict):  # a redelivery's first result
                    ready.append([corr_id, outcome])
                    continue
                assert isinstance(outcome, SignResult)
                result = outcome
            except Refused as exc:
                result = self._refused(prepared, exc)
            except Exception as exc:  # one bad item never takes down the batch or the loop
                result = self._internal(prepared, exc)
            ready.append([corr_id, self._finish(result, t0, prepared)])
        return ready, deferred

    async def sign_deferred(self, deferred: list[Deferred]) -> list[list[Any]]:
        """Unwrap each needed keyring once (concurrently), then open, check and sign each request."""
        groups: dict[tuple[str, int], list[Deferred]] = {}
        for d in deferred:
            sealed = self.vault.sealed.get(d.key_id)
            slot = (sealed.keyring_id, sealed.dek_version) if sealed is not None else ("", 0)
            groups.setdefault(slot, []).append(d)
        slots = [slot for slot in groups if slot[0]]
        await asyncio.gather(
            *(self.vault.data_key(kr, v, max(d.deadline for d in groups[(kr, v)])) for kr, v in slots),
            return_exceptions=True,  # each request meets its own keyring's failure below
        )
        out: list[list[Any]] = []
        for items in groups.values():
            for d in items:
                prepared: Prepared | None = None
                try:
                    again = self._prepare(d.raw, int(time.time() * 1000))  # also re-checks the deadline
                    if isinstance(again, Prepared):
                        prepared = again
                        # the record current *now* is opened, checked and signs (the host may have swapped it)
                        outcome: SignResult | dict[str, Any] = self._sign_with(
                            prepared, await self.vault.open_key(d.key_id, d.deadline)
                        )
                    else:
                        outcome = again
                except Refused as exc:
                    outcome = self._refused(prepared, exc)
                except Exception as exc:
                    outcome = self._internal(prepared, exc)
                if isinstance(outcome, dict):
                    out.append([d.corr_id, outcome])
                    continue
                outcome.timings_us["kms_wait"] = (time.perf_counter_ns() - d.t0_ns) // 1000
                out.append([d.corr_id, self._finish(outcome, d.t0_ns, prepared)])
        return out

    def _finish(self, result: SignResult, t0_ns: int, prepared: Prepared | None = None) -> dict[str, Any]:
        result.enclave_id = self.enclave_id
        result.timings_us["enclave_service"] = (time.perf_counter_ns() - t0_ns) // 1000
        wire = result.to_wire()
        if prepared is not None and prepared.auth_entry is not None and result.status != "expired":
            prepared.auth_entry.result = wire  # a redelivery of this request gets these same bytes
        return wire

    @staticmethod
    def _refused(prepared: Prepared | None, exc: Refused) -> SignResult:
        rid, kid = (prepared.req.request_id, prepared.req.key_id) if prepared is not None else ("", "")
        if exc.status is None:  # a refusal that is no result's (a key management code): a bug here
            return SignResult.failure(rid, kid, Code.INTERNAL, f"enclave failed: {type(exc).__name__}")
        return SignResult.refused(rid, kid, exc)

    @staticmethod
    def _internal(prepared: Prepared | None, exc: Exception) -> SignResult:
        rid, kid = (prepared.req.request_id, prepared.req.key_id) if prepared is not None else ("", "")
        return SignResult.failure(rid, kid, Code.INTERNAL, f"enclave failed: {type(exc).__name__}")

    def _prepare(self, raw: Any, now_ms: int) -> SignResult | Prepared:
        """Decode and check what needs no key: the deadline, that the key exists, the transaction."""
        try:
            m = unpack_map(raw, MAX_REQUEST_BYTES)
        except SchemaError as exc:  # nothing can be read from it
            return SignResult.refused("", "", exc)
        try:
            req = sign_request_from_map(m)
        except SchemaError as exc:  # answered under the ids it carries, as far as they can be read (no second decode)
            kid = m.get("key_id")
            return SignResult.refused(exc.request_id or "", kid if type(kid) is str and len(kid) <= 128 else "", exc)
        if req.deadline_ms is not None and req.deadline_ms <= now_ms:
            return _expired(req)
        if req.key_id not in self.vault.sealed:
            return SignResult.failure(req.request_id, req.key_id, Code.UNKNOWN_KEY, "no such key in this enclave")
        prepared = Prepared(req)
        if req.scheme == "eth_tx":
            prepared.tx = req.parsed or parse_eth_tx(req.payload, req.request_id)
        return prepared

    def _authorize(self, prepared: Prepared, key: OpenedKey) -> dict[str, Any] | None:
        """Scheme, policy and authentication against the opened key, then (only then) the typed-data
        digest. Raises Refused (the policy's, authentication's and the EIP-712 parser's refusals
        included); returns a redelivery's earlier result, or None to sign."""
        req = prepared.req
        if _KEY_SCHEMES[req.scheme] != key.record.scheme:
            raise Refused(Code.SCHEME_MISMATCH, f"a {key.record.scheme} key cannot sign {req.scheme}")
        if key.policy is not None:
            key.policy.check(req.scheme, req.payload, prepared.tx)
        prepared.auth_entry = self.auth.verify(req, key.policy)
        if prepared.auth_entry is not None and prepared.auth_entry.result is not None:
            return dict(prepared.auth_entry.result)  # a redelivery: the same result as the first time
        if req.scheme == "eth_typed_data":
            prepared.typed_digest = typed_data_digest(req.payload)
        return None

    def _sign_with(self, prepared: Prepared, key: OpenedKey) -> SignResult | dict[str, Any]:
        earlier = self._authorize(prepared, key)
        if earlier is not None:
            return earlier
        return self._sign(prepared, key.wallet)

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
                why = "the transaction's 'from' is not this key's address"
                return SignResult.failure(req.request_id, req.key_id, Code.SENDER_MISMATCH, why)
            signed = signers.sign_eth_tx(wallet.private, tx)
            ok.signature, ok.raw_tx, ok.tx_hash = signed.signature, signed.raw_tx, signed.tx_hash
        elif req.scheme == "ed25519":
            ok.signature = signers.sign_ed25519(wallet.private, req.payload)
        else:
            why = f"{req.scheme} is not implemented by this enclave version"
            return SignResult.failure(req.request_id, req.key_id, Code.UNSUPPORTED_SCHEME, why)
        return ok


def _expired(req: SignRequest) -> SignResult:
    return SignResult.failure(req.request_id, req.key_id, Code.DEADLINE_PASSED, "deadline passed before signing")
