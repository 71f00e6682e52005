"""A tight RLP encoder for transactions on the signing path.

Hand-written on purpose: pyrlp's generic sedes machinery costs ~2.5x the whole
signature on this path (NOTES.md). Correctness is proven in tests against
eth-account's own encoding, byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

Item: TypeAlias = "bytes | int | Sequence[Item]"


def _length_prefix(n: int, short: int, long: int) -> bytes:
    if n < 56:
        return bytes((short + n,))
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((long + len(ln),)) + ln


def encode(item: Item) -> bytes:
    if isinstance(item, bytes):
        if len(item) == 1 and item[0] < 0x80:
            return item
        return _length_prefix(len(item), 0x80, 0xB7) + item
    if isinstance(item, int):
        if item < 0:
            raise ValueError("RLP cannot encode negative integers")
        return encode(item.to_bytes((item.bit_length() + 7) // 8, "big"))
    payload = b"".join(encode(x) for x in item)
    return _length_prefix(len(payload), 0xC0, 0xF7) + payload
