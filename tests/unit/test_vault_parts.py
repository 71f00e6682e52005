"""Vault building blocks without a KMS: sealing, the data key cache, NSM encoding."""

from __future__ import annotations

import ctypes

import cbor2
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_worker.attestation import NSM_IOCTL_REQUEST, NsmError, NsmProvider, nsm_attestation_request
from enclave_worker.datakeys import DataKeyCache
from enclave_worker.keyring import seal, unseal
from schemas.records import KeyringEnvelope, SealedKey

ENV = KeyringEnvelope("kr", "cmk", 1, b"blob", 0)


def test_sealed_keys_open_only_with_everything_they_are_bound_to() -> None:
    dek = AESGCM(bytes(32))
    sealed = seal(dek, "k_01", ENV, "secp256k1", b"\x04pub", "0x" + "ab" * 20, b"s" * 32, 0)
    assert unseal(dek, sealed) == b"s" * 32
    assert SealedKey.from_wire(sealed.to_wire()) == sealed
    for change in ({"key_id": "k_02"}, {"dek_version": 2}, {"keyring_id": "other"}, {"scheme": "ed25519"},
                   {"public_key": b"\x04other"}):  # fmt: skip
        moved = SealedKey(**{f: getattr(sealed, f) for f in SealedKey.__dataclass_fields__} | change)
        with pytest.raises(InvalidTag):
            unseal(dek, moved)
    with pytest.raises(InvalidTag):
        unseal(AESGCM(bytes([1]) * 32), sealed)


def test_describe_shows_no_secret() -> None:
    sealed = seal(AESGCM(bytes(32)), "k_01", ENV, "secp256k1", b"\x04pub", "0xabc", b"s" * 32, 0)
    assert set(sealed.describe()) == {"key_id", "scheme", "public_key", "keyring", "address"}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cache_expires_entries_and_wipes_them() -> None:
    clock = _Clock()
    cache = DataKeyCache(max_entries=10, ttl_s=60, clock=clock)
    entry = cache.put("kr", 1, b"\x07" * 32)
    assert cache.get("kr", 1) is entry
    clock.now = 61
    assert cache.get("kr", 1) is None
    assert entry.material == bytearray(32)  # overwritten on eviction
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 1)


def test_cache_bounds_uses_and_size() -> None:
    cache = DataKeyCache(max_entries=2, ttl_s=60, max_uses=3, clock=_Clock())
    entry = cache.put("a", 1, b"\x01" * 32)
    entry.uses = 3
    assert cache.get("a", 1) is None  # used up
    cache.put("a", 1, b"\x01" * 32)
    cache.put("b", 1, b"\x02" * 32)
    assert cache.get("a", 1) is not None  # a is now most recent
    cache.put("c", 1, b"\x03" * 32)
    assert cache.get("b", 1) is None and cache.get("a", 1) is not None and len(cache) == 2


def test_nsm_request_encoding_and_ioctl() -> None:
    assert NSM_IOCTL_REQUEST == 0xC0200A00  # _IOWR(0x0A, 0, two iovecs)
    req = cbor2.loads(nsm_attestation_request(b"pk", None, b"n"))
    assert req == {"Attestation": {"user_data": None, "nonce": b"n", "public_key": b"pk"}}

    calls = []

    def fake_ioctl(fd: int, request: int, msg: object) -> int:
        calls.append(request)
        m = msg  # the _NsmMessage: write a response into its response buffer
        sent = ctypes.string_at(m.request.iov_base, m.request.iov_len)  # type: ignore[attr-defined]
        assert cbor2.loads(sent)["Attestation"]["public_key"] == b"spki"
        reply = cbor2.dumps({"Attestation": {"document": b"\x84cose"}})
        ctypes.memmove(m.response.iov_base, reply, len(reply))  # type: ignore[attr-defined]
        m.response.iov_len = len(reply)  # type: ignore[attr-defined]
        return 0

    provider = NsmProvider(device="/dev/null", ioctl=fake_ioctl)
    assert provider.document(b"spki") == b"\x84cose"
    assert calls == [NSM_IOCTL_REQUEST]

    def refusing_ioctl(fd: int, request: int, msg: object) -> int:
        reply = cbor2.dumps({"Error": "InvalidArgument"})
        ctypes.memmove(msg.response.iov_base, reply, len(reply))  # type: ignore[attr-defined]
        msg.response.iov_len = len(reply)  # type: ignore[attr-defined]
        return 0

    with pytest.raises(NsmError, match="InvalidArgument"):
        NsmProvider(device="/dev/null", ioctl=refusing_ioctl).document(b"spki")
