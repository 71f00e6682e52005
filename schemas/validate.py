"""Small strict field readers shared by the message decoders."""

from __future__ import annotations

from typing import Any

from .errors import SchemaError
from .refusals import Code

UINT256_MAX = (1 << 256) - 1


class OverBudget(Exception):
    """Raised inside msgpack decoding when a message holds more maps and lists than allowed."""


class ContainerBudget:
    """msgpack object_hook/list_hook counting the maps and lists a message builds, so decoding a
    small message of many tiny containers stops early instead of building millions of objects."""

    def __init__(self, budget: int) -> None:
        self.left = budget

    def __call__(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise OverBudget
        return obj


def require(m: dict[str, Any], name: str, rid: str | None = None) -> Any:
    try:
        return m[name]
    except KeyError:
        raise SchemaError(Code.MISSING_FIELD, f"field '{name}' is required", rid) from None


def as_int(value: Any, name: str, rid: str | None = None) -> int:
    # bool is an int in Python but never a valid quantity on the wire
    if type(value) is not int:
        raise SchemaError(Code.WRONG_TYPE, f"'{name}' must be an integer", rid)
    return value


def as_str(value: Any, name: str, rid: str | None = None, *, min_len: int = 1, max_len: int = 128) -> str:
    if type(value) is not str:
        raise SchemaError(Code.WRONG_TYPE, f"'{name}' must be a string", rid)
    if not min_len <= len(value) <= max_len:
        raise SchemaError(Code.INVALID_VALUE, f"'{name}' must be {min_len}-{max_len} characters", rid)
    return value


def as_bytes(value: Any, name: str, rid: str | None = None, *, max_len: int) -> bytes:
    if type(value) is not bytes:
        raise SchemaError(Code.WRONG_TYPE, f"'{name}' must be bytes (msgpack bin)", rid)
    if len(value) > max_len:
        raise SchemaError(Code.INVALID_VALUE, f"'{name}' is longer than {max_len} bytes", rid)
    return value


def as_quantity(value: Any, name: str, rid: str | None = None) -> int:
    """A uint256: a msgpack int, or a "0x" hex string (for values beyond 64 bits)."""
    if type(value) is int:
        n = value
    elif type(value) is str:
        if not (value.startswith("0x") and 2 < len(value) <= 66):
            raise SchemaError(Code.INVALID_VALUE, f"'{name}' must be an int or a 0x hex string", rid)
        try:
            n = int(value[2:], 16)
        except ValueError:
            raise SchemaError(Code.INVALID_VALUE, f"'{name}' is not valid hex", rid) from None
    else:
        raise SchemaError(Code.WRONG_TYPE, f"'{name}' must be an int or a 0x hex string", rid)
    if not 0 <= n <= UINT256_MAX:
        raise SchemaError(Code.INVALID_VALUE, f"'{name}' is out of the uint256 range", rid)
    return n


def as_hex_or_bytes(value: Any, name: str, rid: str | None = None, *, max_len: int, exact: int | None = None) -> bytes:
    """bytes, or a "0x" hex string."""
    if type(value) is bytes:
        out = value
    elif type(value) is str:
        if not value.startswith("0x") or len(value) % 2:
            raise SchemaError(Code.INVALID_VALUE, f"'{name}' must be bytes or an even 0x hex string", rid)
        try:
            out = bytes.fromhex(value[2:])
        except ValueError:
            raise SchemaError(Code.INVALID_VALUE, f"'{name}' is not valid hex", rid) from None
    else:
        raise SchemaError(Code.WRONG_TYPE, f"'{name}' must be bytes or a 0x hex string", rid)
    if exact is not None and len(out) != exact:
        raise SchemaError(Code.INVALID_VALUE, f"'{name}' must be {exact} bytes", rid)
    if len(out) > max_len:
        raise SchemaError(Code.INVALID_VALUE, f"'{name}' is longer than {max_len} bytes", rid)
    return out
