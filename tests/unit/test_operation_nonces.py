"""The enclave's memory of signed operations' nonces: a nonce is refused again until its operation
expires, expired ones are forgotten first, and a full memory refuses rather than forget a live one."""

from __future__ import annotations

from typing import Any, cast

import pytest

from enclave_worker import operations
from enclave_worker.operations import OperationVerifier
from schemas.refusals import Refused


def _verifier() -> OperationVerifier:
    # the nonce memory needs neither the configuration nor the identity
    return OperationVerifier(cast(Any, None), cast(Any, None))


def test_a_nonce_is_refused_until_its_operation_expires() -> None:
    v = _verifier()
    v._remember(b"a" * 16, expires_ms=1_000, now_ms=0)
    with pytest.raises(Refused) as replayed:
        v._remember(b"a" * 16, expires_ms=1_000, now_ms=999)
    assert replayed.value.code.value == "operation_replayed"
    v._remember(b"a" * 16, expires_ms=3_000, now_ms=1_000)  # expired: forgotten, accepted anew


def test_a_full_memory_refuses_until_nonces_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operations, "MAX_REMEMBERED_NONCES", 3)
    v = _verifier()
    for i, expires in enumerate((500, 300, 400)):  # remembered out of expiry order
        v._remember(bytes([i]) * 16, expires_ms=expires, now_ms=0)
    with pytest.raises(Refused) as busy:
        v._remember(b"x" * 16, expires_ms=900, now_ms=299)
    assert busy.value.code.value == "operation_busy"
    v._remember(b"x" * 16, expires_ms=900, now_ms=300)  # the one expiring at 300 went first
    with pytest.raises(Refused):
        v._remember(bytes([0]) * 16, expires_ms=900, now_ms=300)  # the others are still live
    assert len(v._nonces) == 3 == len(v._expiring)
