"""keccak-256 (Ethereum's hash). Note: hashlib.sha3_256 is NOT keccak-256."""

from __future__ import annotations

try:
    from sha3 import keccak_256 as _keccak_256  # safe-pysha3: the fast C implementation

    def keccak256(data: bytes) -> bytes:
        return bytes(_keccak_256(data).digest())

except ImportError:  # pragma: no cover - platforms without a safe-pysha3 wheel
    from Crypto.Hash import keccak as _keccak

    def keccak256(data: bytes) -> bytes:
        return _keccak.new(digest_bits=256, data=data).digest()


def to_checksum_address(addr: bytes) -> str:
    """EIP-55 mixed-case hex of a 20-byte address."""
    hexaddr = addr.hex()
    digest = keccak256(hexaddr.encode()).hex()
    return "0x" + "".join(c.upper() if int(d, 16) >= 8 else c for c, d in zip(hexaddr, digest[:40], strict=True))
