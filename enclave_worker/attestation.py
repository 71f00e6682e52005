"""Attestation providers: what the enclave asks for a document carrying its public key.

- NsmProvider: a real Nitro Enclave, through /dev/nsm (one ioctl, CBOR in and out).
- DevProvider: a COSE_Sign1 (ES384) document with the Nitro field set, signed by
  the dev NSM leaf of the dev PKI, with PCR0 derived from the enclave worker's own
  code - so changed enclave code is refused the key by the dev KMS, as on Nitro.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from schemas.attestation import PROTECTED_ES384, sig_structure


class AttestationProvider(Protocol):
    def document(self, public_key: bytes | None, user_data: bytes | None = None, nonce: bytes | None = None) -> bytes:
        """A COSE_Sign1 attestation document binding these values to this enclave image."""
        ...


# -- measuring the enclave's own code (dev PCR0) ---------------------------------------------

_ENCLAVE_PACKAGES = ("enclave_worker", "schemas")


def measure_enclave_code(config: bytes) -> bytes:
    """SHA-384 over the source of the packages that run inside the enclave and the bytes of its
    configuration file (the dev stand-in for PCR0).

    Any change to that code or configuration changes the measurement, as a rebuilt image
    changes PCR0.
    """
    import importlib

    h = hashlib.sha384()
    for pkg in _ENCLAVE_PACKAGES:
        root = Path(importlib.import_module(pkg).__file__ or "").parent
        for path in sorted(root.rglob("*.py")):
            rel = f"{pkg}/{path.relative_to(root).as_posix()}"
            h.update(rel.encode() + b"\0" + hashlib.sha384(path.read_bytes()).digest())
    h.update(b"enclave-config\0" + hashlib.sha384(config).digest())
    return h.digest()


# -- the dev provider ---------------------------------------------------------------------------


class DevProvider:
    def __init__(self, pki_dir: Path, config: bytes, module_id: str = "dev-enclave") -> None:
        from devkms.pki import load_dev_pki  # the dev NSM's key lives with the dev PKI

        pki = load_dev_pki(pki_dir)
        self._key = pki.leaf_key
        self._leaf_der = pki.leaf.public_bytes(serialization.Encoding.DER)
        self._bundle = [pki.root.public_bytes(serialization.Encoding.DER)]
        self.module_id = module_id
        pcr0 = measure_enclave_code(config)
        self.pcrs = {i: bytes(48) for i in range(16)}
        self.pcrs[0] = pcr0
        self.pcrs[1] = hashlib.sha384(b"dev-kernel").digest()
        self.pcrs[2] = hashlib.sha384(b"dev-application:" + pcr0).digest()

    def document(self, public_key: bytes | None, user_data: bytes | None = None, nonce: bytes | None = None) -> bytes:
        payload = cbor2.dumps(
            {
                "module_id": self.module_id,
                "digest": "SHA384",
                "timestamp": int(time.time() * 1000),
                "pcrs": self.pcrs,
                "certificate": self._leaf_der,
                "cabundle": self._bundle,
                "public_key": public_key,
                "user_data": user_data,
                "nonce": nonce,
            }
        )
        der = self._key.sign(sig_structure(PROTECTED_ES384, payload), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        # real NSM output is an untagged COSE_Sign1 array (starts with 0x84)
        return cbor2.dumps([PROTECTED_ES384, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])


# -- the Nitro Secure Module --------------------------------------------------------------------

NSM_DEVICE = "/dev/nsm"
NSM_RESPONSE_MAX = 0x3000


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _NsmMessage(ctypes.Structure):
    _fields_ = [("request", _IoVec), ("response", _IoVec)]


def _iowr(magic: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (magic << 8) | nr


NSM_IOCTL_REQUEST = _iowr(0x0A, 0, ctypes.sizeof(_NsmMessage))


class NsmError(RuntimeError):
    pass


def nsm_attestation_request(public_key: bytes | None, user_data: bytes | None, nonce: bytes | None) -> bytes:
    return cbor2.dumps({"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}})


def nsm_attestation_response(data: bytes) -> bytes:
    reply = cbor2.loads(data)
    if isinstance(reply, dict) and "Attestation" in reply:
        return bytes(reply["Attestation"]["document"])
    if isinstance(reply, dict) and "Error" in reply:
        raise NsmError(f"NSM refused: {reply['Error']}")
    raise NsmError("unexpected NSM response")


class NsmProvider:
    """Reads attestation documents from /dev/nsm (only inside a Nitro Enclave)."""

    def __init__(self, device: str = NSM_DEVICE, ioctl: Callable[[int, int, object], int] | None = None) -> None:
        self.device = device
        self._ioctl = ioctl or fcntl.ioctl

    def document(self, public_key: bytes | None, user_data: bytes | None = None, nonce: bytes | None = None) -> bytes:
        request = nsm_attestation_request(public_key, user_data, nonce)
        req_buf = ctypes.create_string_buffer(request, len(request))
        resp_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX)
        msg = _NsmMessage(
            _IoVec(ctypes.cast(req_buf, ctypes.c_void_p), len(request)),
            _IoVec(ctypes.cast(resp_buf, ctypes.c_void_p), NSM_RESPONSE_MAX),
        )
        fd = os.open(self.device, os.O_RDWR)
        try:
            self._ioctl(fd, NSM_IOCTL_REQUEST, msg)
        finally:
            os.close(fd)
        return nsm_attestation_response(resp_buf.raw[: msg.response.iov_len])
