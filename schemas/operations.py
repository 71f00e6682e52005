"""Operator-signed admin operations and enclave-signed receipts: the bytes both ends sign.

An admin operation (create, import, rotate) is a msgpack map, sent as the exact
bytes the operators signed, so there is no re-encoding to disagree about:

    {"op": "keys.create", "enclave": <32-byte identity key of the target enclave>,
     "nonce": <16 random bytes>, "expires_ms": <unix ms>, "args": {...}}

Each approval is an ed25519 signature by one operator over
``OPERATION_DOMAIN + operation_bytes``. The enclave answers with a receipt: a
msgpack map signed by its identity key over ``RECEIPT_DOMAIN + receipt_bytes``.
The identity key is bound into the enclave's attestation document
(``user_data``), which the operator verifies against the attestation root and the
expected PCR0 before anything else.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

OPERATION_DOMAIN = b"signer-admin-operation/v1\x00"
RECEIPT_DOMAIN = b"signer-admin-receipt/v1\x00"
IMPORT_LABEL_DOMAIN = b"signer-import/v1\x00"
IDENTITY_TAG = "signer-enclave-identity/v1"

SIGNED_OPS = ("keys.create", "keys.import", "keys.rotate_dek")
MAX_OPERATION_BYTES = 64 * 1024
MAX_VALIDITY_MS = 15 * 60 * 1000  # an operation may be valid for at most 15 minutes
NONCE_BYTES = 16


def canonical(obj: Any) -> Any:
    """Maps as [key, value] pairs sorted by key, recursively: one encoding per value."""
    if type(obj) is dict:
        return [[k, canonical(obj[k])] for k in sorted(obj, key=lambda k: (str(type(k)), k))]
    if type(obj) is list:
        return [canonical(x) for x in obj]
    return obj


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def policy_digest(policy: dict[str, Any] | None) -> bytes:
    """SHA-256 of a policy's canonical encoding (32 zero bytes for no policy)."""
    if policy is None:
        return bytes(32)
    return hashlib.sha256(packb(canonical(policy))).digest()


def import_label(keyring: str, scheme: str, policy: dict[str, Any] | None) -> bytes:
    """The RSA-OAEP label an imported key is encrypted with: it binds the ciphertext to the
    keyring, scheme and policy the operator chose, so it cannot be imported under others."""
    return hashlib.sha256(IMPORT_LABEL_DOMAIN + packb([keyring, scheme, policy_digest(policy)])).digest()


def identity_user_data(identity_public_key: bytes, config_digest: bytes) -> bytes:
    """The attestation document's user_data: the enclave's identity key and its configuration hash."""
    return packb({"tag": IDENTITY_TAG, "identity": identity_public_key, "config": config_digest})


def parse_identity_user_data(user_data: bytes | None) -> tuple[bytes, bytes]:
    """-> (identity public key, config digest); ValueError if this is not an identity document."""
    try:
        m = msgpack.unpackb(user_data or b"", raw=False)
    except Exception:
        raise ValueError("the document's user_data is not an enclave identity") from None
    if type(m) is not dict or m.get("tag") != IDENTITY_TAG:
        raise ValueError("the document's user_data is not an enclave identity")
    identity, config = m.get("identity"), m.get("config")
    if type(identity) is not bytes or len(identity) != 32 or type(config) is not bytes or len(config) != 32:
        raise ValueError("the enclave identity in user_data is malformed")
    return identity, config


def receipt_body(op: str, operation_bytes: bytes, result: dict[str, Any]) -> bytes:
    """What an enclave signs when it completes an operation."""
    return packb(canonical({"op": op, "operation": hashlib.sha256(operation_bytes).digest(), "result": result}))
