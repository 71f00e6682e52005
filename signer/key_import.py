"""Importing an existing private key without it ever crossing the host in clear.

The operator's machine asks the cluster for an enclave's attestation document,
verifies it (pinned root, expected PCR0), and encrypts the key with
RSA-OAEP-SHA256 to the public key the document carries. Only that enclave
process can decrypt it; the host relays ciphertext.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from enclave_worker.cms import OAEP_SHA256
from schemas.attestation import AttestationError, verify_attestation


def encrypt_for_enclave(
    document: bytes, secret: bytes, root: x509.Certificate, expect_pcr0: str | None = None
) -> bytes:
    """Verify the enclave's attestation document and encrypt `secret` to its key."""
    doc = verify_attestation(document, root)
    if expect_pcr0 is not None and doc.image_sha384.lower() != expect_pcr0.lower():
        raise AttestationError(f"the enclave runs image {doc.image_sha384[:16]}..., not the expected one")
    if not doc.public_key:
        raise AttestationError("the document carries no public key")
    key = load_der_public_key(doc.public_key)
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise AttestationError("the attested key is not RSA-2048")
    return key.encrypt(secret, OAEP_SHA256)
