"""Nitro attestation documents: COSE_Sign1 (ES384) over a CBOR payload, and their verification.

Verification (as KMS does it): the Sig_structure ["Signature1", protected, b"",
payload] is signed by the leaf certificate's key; the leaf chains through the
cabundle to a pinned root; every certificate is within its validity.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

ES384 = -35
PROTECTED_ES384 = cbor2.dumps({1: ES384})


class AttestationError(ValueError):
    """An attestation document that must not be trusted; the message says why."""


@dataclass(frozen=True)
class AttestationDoc:
    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: list[bytes]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def image_sha384(self) -> str:
        """What KMS compares with kms:RecipientAttestation:ImageSha384 (PCR0, hex)."""
        return self.pcrs[0].hex()


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def parse_attestation(document: bytes) -> tuple[bytes, bytes, bytes, AttestationDoc]:
    """COSE_Sign1 bytes -> (protected, payload, signature, decoded payload); no trust implied."""
    try:
        obj = cbor2.loads(document)
    except Exception as exc:
        raise AttestationError(f"not CBOR ({type(exc).__name__})") from None
    if isinstance(obj, cbor2.CBORTag) and obj.tag == 18:  # tagged COSE_Sign1 is accepted too
        obj = obj.value
    if not (isinstance(obj, list) and len(obj) == 4):
        raise AttestationError("not a COSE_Sign1 array")
    protected, _unprotected, payload, signature = obj
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)):
        raise AttestationError("COSE_Sign1 fields have the wrong types")
    try:
        header = cbor2.loads(protected)
        body = cbor2.loads(payload)
    except Exception as exc:
        raise AttestationError(f"undecodable COSE header or payload ({type(exc).__name__})") from None
    if not isinstance(header, dict) or header.get(1) != ES384:
        raise AttestationError("the signature algorithm is not ES384")
    try:
        doc = AttestationDoc(
            module_id=str(body["module_id"]),
            digest=str(body["digest"]),
            timestamp_ms=int(body["timestamp"]),
            pcrs={int(k): bytes(v) for k, v in body["pcrs"].items()},
            certificate=bytes(body["certificate"]),
            cabundle=[bytes(c) for c in body["cabundle"]],
            public_key=body.get("public_key"),
            user_data=body.get("user_data"),
            nonce=body.get("nonce"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AttestationError(f"payload lacks the Nitro field set ({exc!r})") from None
    if doc.digest != "SHA384" or 0 not in doc.pcrs:
        raise AttestationError("payload digest must be SHA384 and carry PCR0")
    return protected, payload, signature, doc


def verify_attestation(
    document: bytes, root: x509.Certificate, now: dt.datetime | None = None, max_age_s: float = 300.0
) -> AttestationDoc:
    """Verify a document against a pinned root; return its payload or raise AttestationError."""
    protected, payload, signature, doc = parse_attestation(document)
    now = now or dt.datetime.now(dt.UTC)
    try:
        leaf = x509.load_der_x509_certificate(doc.certificate)
        bundle = [x509.load_der_x509_certificate(c) for c in doc.cabundle]
    except ValueError:
        raise AttestationError("undecodable certificate in the document") from None
    if not bundle or bundle[0] != root:
        raise AttestationError("the certificate bundle does not start at the pinned root")
    chain = [*bundle, leaf]
    for issuer, cert in itertools.pairwise(chain):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise AttestationError(f"certificate {cert.subject.rfc4514_string()} is not issued by its parent") from None
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise AttestationError(f"certificate {cert.subject.rfc4514_string()} is outside its validity")
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1" or len(signature) != 96:
        raise AttestationError("the leaf key is not P-384 or the signature is not 96 bytes")
    der_sig = encode_dss_signature(int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big"))
    try:
        key.verify(der_sig, sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError("the COSE signature does not verify") from None
    age = now.timestamp() - doc.timestamp_ms / 1000
    if age > max_age_s or age < -60:
        raise AttestationError(f"the document is {age:.0f}s old")
    return doc


def decode_cbor_map(data: bytes) -> dict[Any, Any]:
    obj = cbor2.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("not a CBOR map")
    return obj
