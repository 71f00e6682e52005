"""Operator-signed admin operations, checked inside the enclave, and the receipts it signs.

An operation is accepted only if: enough distinct configured operators signed
its exact bytes (the quorum), it names this enclave process's identity key (so
it cannot be replayed to another enclave, or to this one after a restart), it
has not expired and is not valid for longer than MAX_VALIDITY_MS, and its nonce
was not seen before. Nonces are remembered until their operation expires, so a
replay within the validity window is refused too.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from schemas.operations import (
    MAX_OPERATION_BYTES,
    MAX_VALIDITY_MS,
    NONCE_BYTES,
    OPERATION_DOMAIN,
    RECEIPT_DOMAIN,
    SIGNED_OPS,
    receipt_body,
)
from schemas.refusals import Code, Refused

from .trust import EnclaveConfig

MAX_APPROVALS = 32
MAX_REMEMBERED_NONCES = 10_000


class Identity:
    """This enclave process's signing identity: made at start, never leaves the process."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def receipt(self, op: str, operation_bytes: bytes, result: dict[str, Any]) -> dict[str, Any]:
        body = receipt_body(op, operation_bytes, result)
        return {"body": body, "sig": self._key.sign(RECEIPT_DOMAIN + body)}


@dataclass(frozen=True)
class Operation:
    op: str
    args: dict[str, Any]
    raw: bytes  # the exact signed bytes (receipts name their hash)
    approved_by: tuple[str, ...]


class OperationVerifier:
    def __init__(self, config: EnclaveConfig, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self._nonces: dict[bytes, int] = {}  # nonce -> expires_ms
        self._expiring: list[tuple[int, bytes]] = []  # (expires_ms, nonce), a heap: the next to expire first

    def verify(self, op: str, args: Any) -> Operation:
        """Check an operation frame's `args` ({operation: bytes, approvals: [...]}); raise Refused."""
        if type(args) is not dict:
            raise Refused(Code.INVALID_ARGUMENT, "key operation args must be a map")
        raw, approvals = args.get("operation"), args.get("approvals")
        if type(raw) is not bytes or not 1 <= len(raw) <= MAX_OPERATION_BYTES:
            raise Refused(Code.OPERATION_UNSIGNED, f"{op} needs an operator-signed operation (bytes)")
        if type(approvals) is not list or not 1 <= len(approvals) <= MAX_APPROVALS:
            raise Refused(Code.OPERATION_UNSIGNED, f"{op} needs 1-{MAX_APPROVALS} operator approvals")
        signers: set[str] = set()
        for a in approvals:
            if type(a) is not dict or type(a.get("operator")) is not str or type(a.get("sig")) is not bytes:
                raise Refused(Code.OPERATION_UNSIGNED, "an approval is {operator: str, sig: bytes}")
            key = self.config.operators.get(a["operator"])
            if key is None or a["operator"] in signers:
                continue  # unknown or repeated operators do not count towards the quorum
            try:
                key.verify(a["sig"], OPERATION_DOMAIN + raw)
            except InvalidSignature:
                raise Refused(
                    Code.OPERATION_BAD_SIGNATURE, f"operator {a['operator']!r}'s signature does not verify"
                ) from None
            signers.add(a["operator"])
        if len(signers) < self.config.quorum:
            raise Refused(
                Code.OPERATION_QUORUM, f"{len(signers)} valid operator approval(s), {self.config.quorum} required"
            )
        body = _decode(raw)
        if body["op"] != op:
            raise Refused(Code.OPERATION_MISMATCH, f"the signed operation is {body['op']!r}, not {op!r}")
        if body["enclave"] != self.identity.public_key:
            raise Refused(Code.OPERATION_WRONG_ENCLAVE, "the operation was signed for another enclave process")
        now_ms = int(time.time() * 1000)
        expires = body["expires_ms"]
        if expires <= now_ms:
            raise Refused(Code.OPERATION_EXPIRED, "the signed operation has expired")
        if expires - now_ms > MAX_VALIDITY_MS:
            raise Refused(Code.OPERATION_TOO_LONG, f"an operation may be valid for at most {MAX_VALIDITY_MS // 1000}s")
        self._remember(body["nonce"], expires, now_ms)
        return Operation(op, body["args"], raw, tuple(sorted(signers)))

    def _remember(self, nonce: bytes, expires_ms: int, now_ms: int) -> None:
        while self._expiring and self._expiring[0][0] <= now_ms:
            _, gone = heapq.heappop(self._expiring)
            del self._nonces[gone]
        if nonce in self._nonces:
            raise Refused(Code.OPERATION_REPLAYED, "this signed operation was already used")
        if len(self._nonces) >= MAX_REMEMBERED_NONCES:
            # forgetting a live nonce would allow its replay: refuse instead, until some expire
            raise Refused(Code.OPERATION_BUSY, "too many live admin operations; retry in a few minutes")
        self._nonces[nonce] = expires_ms
        heapq.heappush(self._expiring, (expires_ms, nonce))  # O(log n): no re-sort per operation


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_OPERATION_BYTES, max_str_len=MAX_OPERATION_BYTES)
    except Exception:
        raise Refused(Code.INVALID_ARGUMENT, "the signed operation is not msgpack") from None
    if type(body) is not dict or set(body) != {"op", "enclave", "nonce", "expires_ms", "args"}:
        raise Refused(Code.INVALID_ARGUMENT, "a signed operation is {op, enclave, nonce, expires_ms, args}")
    if body["op"] not in SIGNED_OPS or type(body["enclave"]) is not bytes or type(body["args"]) is not dict:
        raise Refused(Code.INVALID_ARGUMENT, f"op must be one of {SIGNED_OPS}, enclave bytes, args a map")
    if type(body["nonce"]) is not bytes or len(body["nonce"]) != NONCE_BYTES or type(body["expires_ms"]) is not int:
        raise Refused(Code.INVALID_ARGUMENT, f"nonce must be {NONCE_BYTES} bytes and expires_ms an integer")
    return body
