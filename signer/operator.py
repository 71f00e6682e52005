"""The operator's side of key management: sign operations, verify the enclave's receipts.

Nothing here trusts the host. For each operation the session asks the cluster for
an enclave's identity (an attestation document), verifies it against the pinned
attestation root and the expected PCR0, signs the operation for that enclave's
identity key with the operator key(s), and checks the signed receipt that comes
back against what was asked. A host can drop an operation; it cannot forge, alter
or replay one, nor fabricate its result.

Operator keys are ed25519 keys in PEM (PKCS#8) files; `OperatorKey` is the seam for
keys held elsewhere (an HSM or a KMS signing key): anything with `operator_id`
and `approve(operation_bytes)`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP

from schemas.attestation import AttestationError, verify_attestation
from schemas.keccak import keccak256, to_checksum_address
from schemas.operations import (
    NONCE_BYTES,
    OPERATION_DOMAIN,
    RECEIPT_DOMAIN,
    import_label,
    packb,
    parse_identity_user_data,
    policy_digest,
    receipt_body,
)

AdminCall = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class ReceiptError(ValueError):
    """The cluster's answer cannot be trusted: a bad attestation, receipt or mismatch."""


class Approver(Protocol):
    operator_id: str

    def approve(self, operation: bytes) -> dict[str, Any]: ...


class OperatorKey:
    """An operator's ed25519 signing key, from a PEM file."""

    def __init__(self, operator_id: str, key: Ed25519PrivateKey) -> None:
        self.operator_id = operator_id
        self._key = key

    @property
    def public_hex(self) -> str:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()

    def approve(self, operation: bytes) -> dict[str, Any]:
        return {"operator": self.operator_id, "sig": self._key.sign(OPERATION_DOMAIN + operation)}

    @classmethod
    def load(cls, path: str | Path) -> OperatorKey:
        """The operator id is the file name without its extension (alice.pem -> alice)."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"operator key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"operator key {path}: not an ed25519 private key")
        return cls(Path(path).stem, key)

    @classmethod
    def create(cls, path: str | Path) -> OperatorKey:
        """A new key written to `path` (mode 0600); its id is the file name without extension."""
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cls(Path(path).stem, key)


@dataclass(frozen=True)
class AttestedEnclave:
    enclave_id: str
    identity: Ed25519PublicKey
    identity_raw: bytes
    import_key: rsa.RSAPublicKey
    pcr0: str
    config_sha256: str


def verify_enclave(document: bytes, root: x509.Certificate, expect_pcr0: str, enclave_id: str) -> AttestedEnclave:
    """Verify an enclave identity document; raise ReceiptError naming the problem."""
    if not expect_pcr0:
        raise ReceiptError("the expected PCR0 of the enclave image is required (--expect-pcr0 / SIGNER_EXPECT_PCR0)")
    try:
        doc = verify_attestation(document, root)
    except AttestationError as exc:
        raise ReceiptError(f"the enclave's attestation does not verify: {exc}") from None
    if doc.pcrs[0] == bytes(len(doc.pcrs[0])):
        raise ReceiptError("the enclave runs in debug mode (PCR0 is all zeros): its memory is readable by the host")
    if doc.image_sha384.lower() != expect_pcr0.lower().removeprefix("0x"):
        raise ReceiptError(f"the enclave runs image {doc.image_sha384[:16]}..., not the expected {expect_pcr0[:16]}...")
    try:
        identity_raw, config = parse_identity_user_data(doc.user_data)
        import_key = serialization.load_der_public_key(doc.public_key or b"")
    except ValueError as exc:
        raise ReceiptError(f"the enclave's identity document is malformed: {exc}") from None
    if not isinstance(import_key, rsa.RSAPublicKey) or import_key.key_size != 2048:
        raise ReceiptError("the attested import key is not RSA-2048")
    return AttestedEnclave(enclave_id, Ed25519PublicKey.from_public_bytes(identity_raw), identity_raw, import_key,
                           doc.image_sha384, config.hex())  # fmt: skip


def check_receipt(enclave: AttestedEnclave, op: str, operation: bytes, receipt: Any) -> dict[str, Any]:
    """The result a receipt vouches for, if the enclave's identity key signed it for this operation."""
    if type(receipt) is not dict or type(receipt.get("body")) is not bytes or type(receipt.get("sig")) is not bytes:
        raise ReceiptError("the reply carries no enclave receipt")
    try:
        enclave.identity.verify(receipt["sig"], RECEIPT_DOMAIN + receipt["body"])
    except InvalidSignature:
        raise ReceiptError("the receipt is not signed by the attested enclave") from None
    try:
        body = dict(msgpack.unpackb(receipt["body"], raw=False))  # canonical: [[key, value], ...]
    except Exception:
        raise ReceiptError("the receipt's body is malformed") from None
    result = _uncanonical(body.get("result"))
    if body.get("op") != op or body.get("operation") != hashlib.sha256(operation).digest():
        raise ReceiptError("the receipt is for another operation")
    if receipt_body(op, operation, result) != receipt["body"]:
        raise ReceiptError("the receipt is not in canonical form")
    return result


def _uncanonical(obj: Any) -> Any:
    """canonical() turns maps into sorted [key, value] pairs; this turns the result back."""
    if type(obj) is list and all(type(p) is list and len(p) == 2 and type(p[0]) is str for p in obj) and obj:
        return {k: _uncanonical(v) for k, v in obj}
    if type(obj) is list:
        return [_uncanonical(x) for x in obj]
    return obj


class AdminSession:
    """Key management as an operator: every answer verified before it is returned."""

    def __init__(
        self, call: AdminCall, operators: list[Approver], root: x509.Certificate, expect_pcr0: str,
        validity_s: float = 300.0,
    ) -> None:  # fmt: skip
        if not operators:
            raise ValueError("at least one operator key is needed (--operator-key / SIGNER_OPERATOR_KEY)")
        if not expect_pcr0:
            raise ValueError("the expected PCR0 is required (--expect-pcr0 / SIGNER_EXPECT_PCR0)")
        self.call, self.operators, self.root = call, operators, root
        self.expect_pcr0, self.validity_s = expect_pcr0, validity_s

    async def enclave(self, keyring: str | None = None, enclave_id: str | None = None) -> AttestedEnclave:
        args: dict[str, Any] = {}
        if keyring:
            args["keyring"] = keyring
        if enclave_id:
            args["enclave_id"] = enclave_id
        reply = await self.call("enclave.identity", args)
        document, eid = reply.get("attestation_document"), reply.get("enclave_id")
        if type(document) is not bytes or type(eid) is not str:
            raise ReceiptError("the cluster's enclave.identity reply is malformed")
        return verify_enclave(document, self.root, self.expect_pcr0, eid)

    def _operation(self, op: str, enclave: AttestedEnclave, args: dict[str, Any]) -> tuple[bytes, list[Any]]:
        body = {"op": op, "enclave": enclave.identity_raw, "nonce": secrets.token_bytes(NONCE_BYTES),
                "expires_ms": int((time.time() + self.validity_s) * 1000), "args": args}  # fmt: skip
        raw = packb(body)
        return raw, [o.approve(raw) for o in self.operators]

    async def _run(self, op: str, keyring: str, args: dict[str, Any], extra: dict[str, Any] | None = None) -> Any:
        enclave = await self.enclave(keyring)
        raw, approvals = self._operation(op, enclave, args)
        reply = await self.call(op, {"enclave_id": enclave.enclave_id, "keyring": keyring, "operation": raw,
                                     "approvals": approvals, **(extra or {})})  # fmt: skip
        return enclave, check_receipt(enclave, op, raw, reply.get("receipt"))

    async def create_key(self, scheme: str, keyring: str, policy: dict[str, Any] | None = None) -> dict[str, Any]:
        args = {"keyring": keyring, "scheme": scheme, "policy": policy}
        enclave, attested = await self._run("keys.create", keyring, args)
        return _describe(self._expect(attested, keyring, scheme, policy), enclave)

    async def import_key(
        self, scheme: str, keyring: str, secret: bytes, policy: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        enclave = await self.enclave(keyring)
        oaep = OAEP(mgf=MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=import_label(keyring, scheme, policy))
        encrypted = enclave.import_key.encrypt(secret, oaep)
        args = {"keyring": keyring, "scheme": scheme, "policy": policy,
                "encrypted_key_sha256": hashlib.sha256(encrypted).digest()}  # fmt: skip
        raw, approvals = self._operation("keys.import", enclave, args)
        reply = await self.call("keys.import", {"enclave_id": enclave.enclave_id, "keyring": keyring, "operation": raw,
                                                "approvals": approvals, "encrypted_key": encrypted})  # fmt: skip
        attested = check_receipt(enclave, "keys.import", raw, reply.get("receipt"))
        return _describe(self._expect(attested, keyring, scheme, policy), enclave)

    async def rotate_dek(self, keyring: str) -> dict[str, Any]:
        enclave, attested = await self._run("keys.rotate_dek", keyring, {"keyring": keyring})
        if attested.get("keyring") != keyring:
            raise ReceiptError("the receipt is for another keyring")
        return {**attested, "enclave_id": enclave.enclave_id, "pcr0": enclave.pcr0}

    async def list_keys(self) -> list[dict[str, Any]]:
        enclave = await self.enclave()
        nonce = secrets.token_bytes(32)
        reply = await self.call("keys.list", {"enclave_id": enclave.enclave_id, "nonce": nonce})
        attested = check_receipt(enclave, "keys.list", nonce, reply.get("receipt"))
        return [_describe(k, enclave) for k in attested.get("keys", [])]

    @staticmethod
    def _expect(attested: Any, keyring: str, scheme: str, policy: dict[str, Any] | None) -> dict[str, Any]:
        if type(attested) is not dict:
            raise ReceiptError("the receipt's result is malformed")
        wanted = {"keyring": keyring, "scheme": scheme, "policy_sha256": policy_digest(policy)}
        for field, value in wanted.items():
            if attested.get(field) != value:
                raise ReceiptError(f"the receipt's {field} is not what was asked for")
        return {**attested, "policy": policy} if policy is not None else attested  # its hash was just checked


def _describe(attested: dict[str, Any], enclave: AttestedEnclave) -> dict[str, Any]:
    """What the CLI prints for a verified key: hex for bytes, plus who vouched for it. The address is
    recomputed from the public key here, whatever the receipt says."""
    pub = attested.get("public_key")
    if attested.get("scheme") == "secp256k1":
        if type(pub) is not bytes or len(pub) != 65:
            raise ReceiptError("the receipt's secp256k1 public key is malformed")
        if attested.get("address") != to_checksum_address(keccak256(pub[1:])[-20:]):
            raise ReceiptError("the receipt's address is not the public key's")
    elif attested.get("address") is not None:
        raise ReceiptError("an ed25519 key has no address")
    out = {k: (v.hex() if type(v) is bytes else v) for k, v in attested.items() if v is not None}
    return {**out, "enclave_id": enclave.enclave_id, "pcr0": enclave.pcr0, "verified": True}
