"""The records a keyring is stored as, outside the enclave: the wrapped keyring (`KeyringEnvelope`)
and each wallet key sealed under its data key (`SealedKey`).

Enclave workers produce them (enclave_worker/keyring.py seals and opens them); the host keeps them
in its key store and loads them into every enclave. They come back from untrusted storage, so
`from_wire` is strict: exact types, bounded sizes, no unknown fields (RecordError, code
``invalid_record``). A sealed key's associated data (`SealedKey.aad`) binds keyring, data key
version, key id, scheme, public key and policy: a record moved or altered in any of these does not
open. Nothing here is secret: a record is useless without an attested enclave that KMS gives the
data key to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import msgpack

from .names import NAME_RULE, valid_name
from .refusals import Code, Refused

RECORD_VERSION = 1


@dataclass(frozen=True)
class KeyringEnvelope:
    keyring_id: str
    kms_key_id: str
    dek_version: int
    encrypted_dek: bytes  # KMS CiphertextBlob
    created_ms: int

    def kms_context(self) -> dict[str, str]:
        """KMS encryption context: binds the DEK ciphertext to this keyring and version."""
        return {"signer:keyring": self.keyring_id, "signer:dek_version": str(self.dek_version)}

    def to_wire(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_wire(cls, m: Any) -> KeyringEnvelope:
        """Strict: exact types and bounded sizes (these records come from untrusted storage)."""
        m = _record(m, _ENVELOPE_FIELDS)
        return cls(_name(m, "keyring_id"), _str(m, "kms_key_id", 256), _version(m),
                   _bytes(m, "encrypted_dek", MAX_ENCRYPTED_DEK_BYTES), _ms(m))  # fmt: skip


@dataclass(frozen=True)
class SealedKey:
    key_id: str
    keyring_id: str
    dek_version: int
    scheme: str  # "secp256k1" | "ed25519"
    public_key: bytes
    address: str | None
    nonce: bytes
    ciphertext: bytes  # AES-256-GCM(secret) with tag
    created_ms: int
    policy: dict[str, Any] | None = None  # sealed with the key: part of the associated data

    def aad(self) -> bytes:
        """The associated data (computed once per record object: a policy's canonical form is not free)."""
        return self._aad

    @cached_property
    def _aad(self) -> bytes:
        bound: list[Any] = [
            "signer-key/v1",
            self.keyring_id,
            self.dek_version,
            self.key_id,
            self.scheme,
            self.public_key,
        ]
        if self.policy is not None:
            bound.append(_canonical(self.policy))
        return msgpack.packb(bound, use_bin_type=True)

    def describe(self) -> dict[str, Any]:
        """What a key's owner may see: no secret, sealed or not."""
        out: dict[str, Any] = {"key_id": self.key_id, "scheme": self.scheme, "public_key": self.public_key.hex(),
                               "keyring": self.keyring_id}  # fmt: skip
        if self.address:
            out["address"] = self.address
        if self.policy is not None:
            out["policy"] = self.policy
        return out

    def to_wire(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_wire(cls, m: Any) -> SealedKey:
        """Strict: exact types and bounded sizes (these records come from untrusted storage)."""
        m = _record(m, _SEALED_FIELDS)
        scheme = m["scheme"]
        if scheme not in ("secp256k1", "ed25519"):
            raise RecordError("scheme must be secp256k1 or ed25519")
        address = m.get("address")
        if address is not None and (type(address) is not str or len(address) != 42):
            raise RecordError("address must be a 0x-prefixed 20-byte hex string or absent")
        policy = m.get("policy")
        if policy is not None and not policy_shape_ok(policy):
            raise RecordError(f"policy must be a map of at most {MAX_POLICY_BYTES} bytes nested at most "
                              f"{MAX_POLICY_DEPTH} deep, or absent")  # fmt: skip
        nonce = _bytes(m, "nonce", 12)
        if len(nonce) != 12:
            raise RecordError("nonce must be 12 bytes")
        return cls(_name(m, "key_id"), _name(m, "keyring_id"), _version(m), scheme, _bytes(m, "public_key", 65),
                   address, nonce, _bytes(m, "ciphertext", 64), _ms(m), policy)  # fmt: skip


def _canonical(obj: Any) -> Any:
    """Maps with sorted keys, recursively: the same policy always binds the same bytes."""
    if isinstance(obj, dict):
        return [[k, _canonical(obj[k])] for k in sorted(obj)]
    if isinstance(obj, list):
        return [_canonical(x) for x in obj]
    return obj


class RecordError(Refused, ValueError):
    """A keyring or key record (from untrusted storage) that is not well-formed: always ``invalid_record``."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.INVALID_RECORD, message)


_ENVELOPE_FIELDS = frozenset({"v", "keyring_id", "kms_key_id", "dek_version", "encrypted_dek", "created_ms"})
_SEALED_FIELDS = frozenset({"v", "key_id", "keyring_id", "dek_version", "scheme", "public_key", "address", "nonce",
                            "ciphertext", "created_ms", "policy"})  # fmt: skip


MAX_ENCRYPTED_DEK_BYTES = 1024  # a KMS CiphertextBlob of a 32-byte data key is ~184 bytes
MAX_POLICY_DEPTH = 6
MAX_POLICY_BYTES = 64 * 1024  # encoded; a full 1,024-address allow-list is ~45 KiB


def shallow(obj: Any, max_depth: int) -> bool:
    """True if maps and lists nest at most max_depth deep (checked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if type(item) is dict:
            children = list(item.values())
        elif type(item) is list:
            children = item
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((c, depth + 1) for c in children)
    return True


def policy_shape_ok(policy: Any) -> bool:
    """A policy's shape before it is parsed: a map, shallow, and small once encoded."""
    if type(policy) is not dict or not shallow(policy, MAX_POLICY_DEPTH):
        return False
    try:
        return len(msgpack.packb(policy, use_bin_type=True)) <= MAX_POLICY_BYTES
    except (TypeError, ValueError, OverflowError):
        return False


def _record(m: Any, fields: frozenset[str]) -> dict[str, Any]:
    if type(m) is not dict:
        raise RecordError("a record must be a map")
    if not set(m) <= fields:
        raise RecordError(f"unknown record fields {sorted(str(k)[:32] for k in set(m) - fields)[:8]}")
    if m.get("v", RECORD_VERSION) != RECORD_VERSION:
        raise RecordError(f"record version must be {RECORD_VERSION}")
    return m


def _name(m: dict[str, Any], field: str) -> str:
    value = m.get(field)
    if not valid_name(value):
        raise RecordError(f"{field} must be {NAME_RULE}")
    return str(value)


def _str(m: dict[str, Any], field: str, max_len: int) -> str:
    value = m.get(field)
    if type(value) is not str or not 1 <= len(value) <= max_len:
        raise RecordError(f"{field} must be a string of 1-{max_len} characters")
    return value


def _bytes(m: dict[str, Any], field: str, max_len: int) -> bytes:
    value = m.get(field)
    if type(value) is not bytes or not 1 <= len(value) <= max_len:
        raise RecordError(f"{field} must be 1-{max_len} bytes")
    return value


def _version(m: dict[str, Any]) -> int:
    value = m.get("dek_version")
    if type(value) is not int or not 1 <= value <= 2**31:
        raise RecordError("dek_version must be a positive integer")
    return value


def _ms(m: dict[str, Any]) -> int:
    value = m.get("created_ms")
    if type(value) is not int or not 0 <= value < 2**63:
        raise RecordError("created_ms must be a non-negative integer")
    return value
