"""SignResult: what the cluster publishes to `sign.results` (or the request's reply_topic)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from .refusals import RESULT_STATUSES, Code, Refused
from .sign_request import unpack_map
from .validate import as_str, require

VERSION = 1
STATUSES = ("ok", *RESULT_STATUSES)


@dataclass(slots=True)
class SignResult:
    request_id: str
    key_id: str
    status: str
    signature: bytes | None = None
    raw_tx: bytes | None = None
    tx_hash: bytes | None = None
    error: dict[str, str] | None = None
    enclave_id: str | None = None
    timings_us: dict[str, int] = field(default_factory=dict)
    v: int = VERSION

    @classmethod
    def failure(cls, request_id: str, key_id: str, code: Code, message: str, **kw: Any) -> SignResult:
        """A refused request: its status is the catalogue's for ``code`` (schemas.refusals)."""
        if not isinstance(code, Code) or code.status is None:
            raise ValueError(f"{code!r} is not a result code of the refusal catalogue")
        return cls(request_id, key_id, code.status, error={"code": code.value, "message": message}, **kw)

    @classmethod
    def refused(cls, request_id: str, key_id: str, exc: Refused, **kw: Any) -> SignResult:
        return cls.failure(request_id, key_id, exc.code, exc.message, **kw)

    def to_wire(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "v": self.v,
            "request_id": self.request_id,
            "key_id": self.key_id,
            "status": self.status,
        }
        # spelled out rather than a loop over names: built once per request, in the enclave
        if self.signature is not None:
            m["signature"] = self.signature
        if self.raw_tx is not None:
            m["raw_tx"] = self.raw_tx
        if self.tx_hash is not None:
            m["tx_hash"] = self.tx_hash
        if self.error is not None:
            m["error"] = self.error
        if self.enclave_id is not None:
            m["enclave_id"] = self.enclave_id
        if self.timings_us:
            m["timings_us"] = self.timings_us
        return m

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> SignResult:
        status = as_str(require(m, "status"), "status", max_len=16)
        return cls(
            request_id=as_str(require(m, "request_id"), "request_id"),
            key_id=as_str(require(m, "key_id"), "key_id", min_len=0),
            status=status,
            signature=m.get("signature"),
            raw_tx=m.get("raw_tx"),
            tx_hash=m.get("tx_hash"),
            error=m.get("error"),
            enclave_id=m.get("enclave_id"),
            timings_us=m.get("timings_us") or {},
            v=m.get("v", VERSION),
        )


def decode_sign_result(raw: bytes) -> SignResult:
    return SignResult.from_map(unpack_map(raw, 1024 * 1024))
