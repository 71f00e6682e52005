"""The dev attestation PKI: a root CA (what KMS pins) and a leaf for the dev NSM.

On Nitro the Nitro hypervisor holds the signing key and AWS's root CA is
pinned. Here a directory holds both, created once and reused across restarts.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT_CERT = "root.der"
LEAF_CERT = "nsm-leaf.der"
LEAF_KEY = "nsm-leaf-key.pem"


@dataclass(frozen=True)
class DevPki:
    root: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enclave-signer dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # fmt: skip


def ensure_dev_pki(directory: Path) -> DevPki:
    """Create the dev CA and the dev NSM leaf in `directory` if absent; load them."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / ROOT_CERT).exists():
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        root_key = ec.generate_private_key(ec.SECP384R1())
        root = (
            x509.CertificateBuilder()
            .subject_name(_name("dev attestation root"))
            .issuer_name(_name("dev attestation root"))
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(root_key, hashes.SHA384())
        )
        leaf_key = ec.generate_private_key(ec.SECP384R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name("dev nsm"))
            .issuer_name(root.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(root_key, hashes.SHA384())
        )
        key_path = directory / LEAF_KEY
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
        (directory / LEAF_CERT).write_bytes(leaf.public_bytes(serialization.Encoding.DER))
        (directory / ROOT_CERT).write_bytes(root.public_bytes(serialization.Encoding.DER))  # last: marks complete
    return load_dev_pki(directory)


def load_dev_pki(directory: Path) -> DevPki:
    key = serialization.load_pem_private_key((directory / LEAF_KEY).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return DevPki(
        root=x509.load_der_x509_certificate((directory / ROOT_CERT).read_bytes()),
        leaf=x509.load_der_x509_certificate((directory / LEAF_CERT).read_bytes()),
        leaf_key=key,
    )


def load_root(directory: Path) -> x509.Certificate:
    return x509.load_der_x509_certificate((directory / ROOT_CERT).read_bytes())
