"""EIP-712 typed structured data: hashStruct, encodeType, the domain separator and the digest.

Implements the full encoding: nested structs, fixed and dynamic arrays (nested),
dynamic `bytes`/`string`, `bytesN`, `intN`/`uintN`, `bool`, `address`. Inputs are
bounded (depth, array length, total size) and every violation is a TypedDataError
with a code. Correctness is proven in the tests against eth-account.
"""

from __future__ import annotations

import re
from typing import Any

from schemas.keccak import keccak256

MAX_DEPTH = 16  # struct and array nesting levels
MAX_ARRAY = 1024  # elements per array
MAX_FIELDS = 64  # fields per struct type
MAX_TYPES = 64  # struct types per document
MAX_NODES = 20_000  # values encoded per document
MAX_DYNAMIC_BYTES = 64 * 1024  # one string or bytes value

_DOMAIN_FIELDS = (("name", "string"), ("version", "string"), ("chainId", "uint256"),
                  ("verifyingContract", "address"), ("salt", "bytes32"))  # fmt: skip
_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
_ARRAY = re.compile(r"^(.*)\[(\d*)\]$")
_INT = re.compile(r"^(u?)int(\d{0,3})$")
_BYTES_N = re.compile(r"^bytes(\d{1,2})$")


class TypedDataError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _bad(message: str) -> TypedDataError:
    return TypedDataError("invalid_typed_data", message)


class _Encoder:
    def __init__(self, types: dict[str, list[tuple[str, str]]]) -> None:
        self.types = types
        self.nodes = 0
        self._type_hash: dict[str, bytes] = {}

    def dependencies(self, primary: str, found: set[str] | None = None) -> set[str]:
        found = found if found is not None else set()
        if primary in found or primary not in self.types:
            return found
        found.add(primary)
        for _, ftype in self.types[primary]:
            base = ftype
            while (m := _ARRAY.match(base)) is not None:
                base = m.group(1)
            self.dependencies(base, found)
        return found

    def encode_type(self, primary: str) -> str:
        deps = sorted(self.dependencies(primary) - {primary})
        return "".join(f"{t}({','.join(f'{ft} {fn}' for fn, ft in self.types[t])})" for t in [primary, *deps])

    def type_hash(self, primary: str) -> bytes:
        h = self._type_hash.get(primary)
        if h is None:
            h = self._type_hash[primary] = keccak256(self.encode_type(primary).encode())
        return h

    def hash_struct(self, primary: str, value: Any, depth: int) -> bytes:
        if depth > MAX_DEPTH:
            raise TypedDataError("typed_data_too_deep", f"nesting deeper than {MAX_DEPTH}")
        if type(value) is not dict:
            raise _bad(f"a {primary} value must be a map")
        parts = [self.type_hash(primary)]
        for fname, ftype in self.types[primary]:
            if fname not in value:
                raise _bad(f"{primary}.{fname} is missing")
            parts.append(self.encode_value(ftype, value[fname], depth + 1))
        return keccak256(b"".join(parts))

    def encode_value(self, ftype: str, value: Any, depth: int) -> bytes:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise TypedDataError("typed_data_too_large", f"more than {MAX_NODES} values")
        if depth > MAX_DEPTH:
            raise TypedDataError("typed_data_too_deep", f"nesting deeper than {MAX_DEPTH}")
        m = _ARRAY.match(ftype)
        if m is not None:
            if type(value) is not list:
                raise _bad(f"a {ftype} value must be a list")
            if len(value) > MAX_ARRAY:
                raise TypedDataError("typed_data_too_large", f"an array longer than {MAX_ARRAY}")
            if m.group(2) and len(value) != int(m.group(2)):
                raise _bad(f"{ftype} needs exactly {m.group(2)} elements")
            return keccak256(b"".join(self.encode_value(m.group(1), v, depth + 1) for v in value))
        if ftype in self.types:
            return self.hash_struct(ftype, value, depth)
        return _atomic(ftype, value)


def _as_int(value: Any, ftype: str) -> int:
    if type(value) is int:
        return value
    if type(value) is str:
        try:
            return int(value, 16) if value.lower().startswith(("0x", "-0x")) else int(value, 10)
        except ValueError:
            raise _bad(f"{value[:40]!r} is not a {ftype}") from None
    raise _bad(f"a {ftype} value must be an integer or a numeric string")


def _as_bytes(value: Any, ftype: str) -> bytes:
    if type(value) is bytes:
        return value
    if type(value) is str and value.startswith("0x"):
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            raise _bad(f"{ftype} value is not hex") from None
    raise _bad(f"a {ftype} value must be bytes or a 0x hex string")


def _atomic(ftype: str, value: Any) -> bytes:
    if ftype == "string":
        if type(value) is not str:
            raise _bad("a string value must be a string")
        data = value.encode()
        if len(data) > MAX_DYNAMIC_BYTES:
            raise TypedDataError("typed_data_too_large", f"a string longer than {MAX_DYNAMIC_BYTES} bytes")
        return keccak256(data)
    if ftype == "bytes":
        data = _as_bytes(value, ftype)
        if len(data) > MAX_DYNAMIC_BYTES:
            raise TypedDataError("typed_data_too_large", f"bytes longer than {MAX_DYNAMIC_BYTES}")
        return keccak256(data)
    if ftype == "bool":
        if type(value) is not bool:
            raise _bad("a bool value must be true or false")
        return int(value).to_bytes(32, "big")
    if ftype == "address":
        data = _as_bytes(value, ftype)
        if len(data) != 20:
            raise _bad("an address is 20 bytes")
        return data.rjust(32, b"\0")
    m = _BYTES_N.match(ftype)
    if m is not None:
        data = _as_bytes(value, ftype)
        if len(data) != int(m.group(1)):
            raise _bad(f"a {ftype} value must be exactly {m.group(1)} bytes")
        return data.ljust(32, b"\0")
    m = _INT.match(ftype)
    if m is not None:
        bits = int(m.group(2) or 256)
        n = _as_int(value, ftype)
        if m.group(1):  # uint
            if not 0 <= n < (1 << bits):
                raise _bad(f"{n} does not fit {ftype}")
            return n.to_bytes(32, "big")
        if not -(1 << (bits - 1)) <= n < (1 << (bits - 1)):
            raise _bad(f"{n} does not fit {ftype}")
        return (n % (1 << 256)).to_bytes(32, "big")
    raise _bad(f"unknown type {ftype[:40]!r}")


def _valid_atomic_type(t: str) -> bool:
    if t in ("string", "bytes", "bool", "address"):
        return True
    if (m := _BYTES_N.match(t)) is not None:
        return 1 <= int(m.group(1)) <= 32
    if (m := _INT.match(t)) is not None:
        bits = int(m.group(2) or 256)
        return 8 <= bits <= 256 and bits % 8 == 0
    return False


def _parse_types(raw: Any) -> dict[str, list[tuple[str, str]]]:
    if type(raw) is not dict or len(raw) > MAX_TYPES:
        raise _bad(f"types must be a map of at most {MAX_TYPES} struct types")
    types: dict[str, list[tuple[str, str]]] = {}
    for name, fields in raw.items():
        if type(name) is not str or not _IDENT.match(name):
            raise _bad(f"bad type name {str(name)[:40]!r}")
        if type(fields) is not list or len(fields) > MAX_FIELDS:
            raise _bad(f"{name} must list at most {MAX_FIELDS} fields")
        parsed = []
        for f in fields:
            if type(f) is not dict or type(f.get("name")) is not str or type(f.get("type")) is not str:
                raise _bad(f"{name} has a field that is not {{name, type}}")
            parsed.append((f["name"], f["type"]))
        types[name] = parsed
    for name, fields in types.items():
        for fname, ftype in fields:
            base = ftype
            dims = 0
            while (m := _ARRAY.match(base)) is not None:
                base = m.group(1)
                dims += 1
            if dims > MAX_DEPTH:
                raise TypedDataError("typed_data_too_deep", f"{name}.{fname} nests arrays too deeply")
            if base not in types and not _valid_atomic_type(base):
                raise _bad(f"{name}.{fname} has unknown type {ftype[:40]!r}")
    return types


def typed_data_digest(doc: Any) -> bytes:
    """keccak256(0x19 0x01 || domainSeparator || hashStruct(message)) for an EIP-712 document."""
    if type(doc) is not dict:
        raise _bad("typed data must be a map")
    types = _parse_types(doc.get("types"))
    domain = doc.get("domain")
    if type(domain) is not dict:
        raise _bad("domain must be a map")
    if "EIP712Domain" not in types:  # derived from the domain's fields, in the standard order
        types["EIP712Domain"] = [(n, t) for n, t in _DOMAIN_FIELDS if n in domain]
    primary = doc.get("primaryType")
    if type(primary) is not str or primary not in types:
        raise _bad("primaryType must name one of the types")
    enc = _Encoder(types)
    domain_separator = enc.hash_struct("EIP712Domain", domain, 0)
    if primary == "EIP712Domain":
        return keccak256(b"\x19\x01" + domain_separator)
    return keccak256(b"\x19\x01" + domain_separator + enc.hash_struct(primary, doc.get("message"), 0))


def domain_chain_id(doc: dict[str, Any]) -> int | None:
    chain = (doc.get("domain") or {}).get("chainId")
    if chain is None:
        return None
    try:
        return _as_int(chain, "uint256")
    except TypedDataError:
        return None
