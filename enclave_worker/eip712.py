"""EIP-712 typed structured data: hashStruct, encodeType, the domain separator and the digest.

Implements the full encoding: nested structs (recursive types too), fixed and dynamic
arrays (nested), dynamic `bytes`/`string`, `bytesN`, `intN`/`uintN`, `bool`, `address`.
Correctness is proven in the tests against eth-account.

Everything in a document is hostile input, so its cost is linear in its size and capped:

- the types are parsed once, each field's type string compiled once (no regex runs per
  value), and checked before any value is encoded: struct types, fields per type, fields
  in all, name and type string lengths, array dimensions and fixed array lengths;
- encodeType and the type hash of each struct type are computed once per document;
- nesting depth is checked before descending, an array's length and a string's before
  they are walked or encoded, an integer string's before it is parsed;
- every piece of work (a type or field declared, a value encoded, a value hashed, bytes
  hashed, a type visited to build an encodeType) is charged against the document's cost
  budget (MAX_COST) before it is done, so a document over budget is refused having cost
  at most the budget, however it is built: types that all refer to each other, one value
  named by many fields, and long arrays cannot multiply the work beyond it.

Every violation is a TypedDataError: `typed_data_too_deep` (nesting), `typed_data_too_large`
(any cap or the budget) or `invalid_typed_data` (not a valid document). `typed_data_domain`
and its two helpers read only the domain (bounded cost), for the key policy to check before
any digest is computed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from schemas.keccak import keccak256, to_checksum_address
from schemas.refusals import Code, Refused

MAX_DEPTH = 16  # struct and array levels, the primary struct being the first
MAX_ARRAY = 1024  # elements per array (and the largest fixed array size)
MAX_FIELDS = 64  # fields per struct type
MAX_TYPES = 64  # struct types a document declares (EIP712Domain included)
MAX_TOTAL_FIELDS = 256  # fields over all the struct types of a document
MAX_NAME = 64  # characters in a type or field name
MAX_TYPE_STRING = MAX_NAME + 6 * MAX_DEPTH  # characters in a field's type, e.g. `Person[2][]`
MAX_DYNAMIC_BYTES = 64 * 1024  # one string or bytes value
MAX_INT_STRING = 80  # characters in an integer given as a string ("0x" hex or decimal)

# The work a document may cost, in units of about one encoded value (each weight below is set
# from measurement so that a unit costs about the same whatever the work). Charged before the
# work is done, so a document over budget is refused before it costs more than the budget:
MAX_COST = 1024
COST_TYPE = 4  # each struct type declared
COST_FIELD = 3  # each field declared
COST_VALUE = 1  # each value encoded (a struct's field or an array's element)
COST_HASH = 3  # each value hashed on top (struct, array, string, bytes)
COST_INT_STRING = 2  # each integer given as a string, on top (it is parsed)
COST_TYPE_VISIT = 1  # each struct type visited to build an encodeType
COST_BYTES = 128  # bytes hashed (string and bytes values, encodeType strings) per unit

_DOMAIN_FIELDS = (("name", "string"), ("version", "string"), ("chainId", "uint256"),
                  ("verifyingContract", "address"), ("salt", "bytes32"))  # fmt: skip
_IDENT = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_DIMS = re.compile(r"(?:\[(?:[1-9][0-9]*)?\])+")
_INT = re.compile(r"(u?)int([0-9]{0,3})")
_BYTES_N = re.compile(r"bytes([0-9]{1,2})")
_INT_STRING = re.compile(r"0x[0-9a-fA-F]+|-?[0-9]+")
_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_EMPTY_KECCAK = keccak256(b"")
_ZERO = bytes(32)
_ONE = (1).to_bytes(32, "big")

# a compiled field type: (_ATOM, encode, name) | (_STRUCT, struct name) | (_ARRAY, fixed length or -1, element)
_ATOM, _STRUCT, _ARRAY = 0, 1, 2
Spec = tuple[Any, ...]


class TypedDataError(Refused, ValueError):
    """A document refused: `typed_data_too_deep`, `typed_data_too_large` or `invalid_typed_data`."""


def _bad(message: str) -> TypedDataError:
    return TypedDataError(Code.INVALID_TYPED_DATA, message)


def _clip(value: Any) -> str:
    """A short rendering of a hostile value for a message, at a cost independent of its size."""
    if type(value) is str:
        return repr(value[:40])
    if type(value) is int and value.bit_length() <= 128:
        return str(value)
    return f"<{type(value).__name__}>"


# -- atomic values --------------------------------------------------------------------------------


def _as_int(value: Any, ftype: str) -> int:
    """An int, or a string: "0x" hex or decimal (ASCII, at most MAX_INT_STRING characters)."""
    if type(value) is int:
        return value
    if type(value) is str:
        if len(value) > MAX_INT_STRING or _INT_STRING.fullmatch(value) is None:
            raise _bad(f"{_clip(value)} is not a {ftype}")
        return int(value, 16) if value.startswith("0x") else int(value, 10)
    raise _bad(f"a {ftype} value must be an integer or a numeric string")


def _as_bytes(value: Any, ftype: str, max_len: int, too_long: Code = Code.INVALID_TYPED_DATA) -> bytes:
    """bytes, or a "0x" hex string; longer than max_len bytes is refused (code `too_long`) before conversion."""
    if type(value) is bytes:
        if len(value) > max_len:
            raise TypedDataError(too_long, f"a {ftype} value longer than {max_len} bytes")
        return value
    if type(value) is str and value.startswith("0x"):
        if len(value) > 2 + 2 * max_len:
            raise TypedDataError(too_long, f"a {ftype} value longer than {max_len} bytes")
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            raise _bad(f"a {ftype} value is not hex") from None
    raise _bad(f"a {ftype} value must be bytes or a 0x hex string")


def _int_encoder(ftype: str, bits: int, signed: bool, charge: Callable[[int], None]) -> Callable[[Any], bytes]:
    """intN / uintN; a value given as a string is charged COST_INT_STRING more (it is parsed)."""
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    mod = 1 << 256

    def encode(value: Any) -> bytes:
        if type(value) is int:
            n = value
        else:
            charge(COST_INT_STRING)
            n = _as_int(value, ftype)
        if low <= n < high:
            return (n % mod).to_bytes(32, "big")
        raise _bad(f"{_clip(n)} does not fit {ftype}")

    return encode


def _bytes_n_encoder(ftype: str, size: int) -> Callable[[Any], bytes]:
    def encode(value: Any) -> bytes:
        data = _as_bytes(value, ftype, size)
        if len(data) != size:
            raise _bad(f"a {ftype} value must be exactly {size} bytes")
        return data.ljust(32, b"\0")

    return encode


def _encode_bool(value: Any) -> bytes:
    if value is True:
        return _ONE
    if value is False:
        return _ZERO
    raise _bad("a bool value must be true or false")


def _encode_address(value: Any) -> bytes:
    data = _as_bytes(value, "address", 20)
    if len(data) != 20:
        raise _bad("an address is 20 bytes")
    return data.rjust(32, b"\0")


@functools.lru_cache(maxsize=1024)  # type names are short (MAX_NAME); a miss only costs the regexes
def _atomic(t: str) -> tuple[str, int] | None:
    """A fixed-size atomic type's (kind, size): ("bool", 0), ("address", 0), ("bytesN", N),
    ("int", bits), ("uint", bits); None if `t` is not one (`int`/`uint` alone are 256 bits)."""
    if t == "bool" or t == "address":
        return t, 0
    if (m := _BYTES_N.fullmatch(t)) is not None:
        size = int(m.group(1))
        return ("bytesN", size) if 1 <= size <= 32 and m.group(1)[0] != "0" else None
    if (m := _INT.fullmatch(t)) is not None:
        digits = m.group(2)
        bits = int(digits) if digits else 256
        if not 8 <= bits <= 256 or bits % 8 or digits.startswith("0"):
            return None
        return ("uint" if m.group(1) else "int"), bits
    return None


def _static_encoder(t: str, charge: Callable[[int], None]) -> Callable[[Any], bytes] | None:
    """The encoder of a fixed-size atomic type, None if `t` is not one."""
    info = _atomic(t)
    if info is None:
        return None
    kind, size = info
    if kind == "bool":
        return _encode_bool
    if kind == "address":
        return _encode_address
    if kind == "bytesN":
        return _BYTES_N_ENCODERS[size]
    return _int_encoder(t, size, kind == "int", charge)


_BYTES_N_ENCODERS = {n: _bytes_n_encoder(f"bytes{n}", n) for n in range(1, 33)}


def _is_atomic_name(t: str) -> bool:
    return t in ("string", "bytes") or _atomic(t) is not None


# -- types ----------------------------------------------------------------------------------------


def _is_name(value: Any) -> bool:
    """[A-Za-z_$][A-Za-z0-9_$]*, at most MAX_NAME characters (ASCII isidentifier() is the same without `$`)."""
    if type(value) is not str or len(value) > MAX_NAME or not value.isascii():
        return False
    return value.isidentifier() or _IDENT.fullmatch(value) is not None


def _name(value: Any, what: str) -> str:
    if not _is_name(value):
        raise _bad(f"{what} {_clip(value)} is not a name ([A-Za-z_$][A-Za-z0-9_$]*, at most {MAX_NAME})")
    return str(value)


def _declared_fields(name: str, fields: Any) -> list[tuple[str, str]]:
    """A struct type's [(field name, type string)], checked for shape and size only."""
    if type(fields) is not list:
        raise _bad(f"{name} must be a list of fields")
    if len(fields) > MAX_FIELDS:
        raise TypedDataError(Code.TYPED_DATA_TOO_LARGE, f"{name} has more than {MAX_FIELDS} fields")
    out = []
    seen = set()
    for f in fields:
        if type(f) is not dict:
            raise _bad(f"{name} has a field that is not {{name, type}}")
        fname, ftype = f.get("name"), f.get("type")
        if not _is_name(fname):
            raise _bad(f"{name}: field name {_clip(fname)} is not a name ([A-Za-z_$][A-Za-z0-9_$]*, "
                       f"at most {MAX_NAME})")  # fmt: skip
        if fname in seen:
            raise _bad(f"{name} has two fields named {fname}")
        if type(ftype) is not str:
            raise _bad(f"{name}.{fname} has no type")
        if len(ftype) > MAX_TYPE_STRING:
            raise TypedDataError(
                Code.TYPED_DATA_TOO_LARGE, f"{name}.{fname}: a type longer than {MAX_TYPE_STRING} characters"
            )
        seen.add(fname)
        out.append((str(fname), ftype))
    return out


def _split_type(ftype: str, where: str) -> tuple[str, list[int]]:
    """`Person[2][]` -> ("Person", [2, -1]): the base type and the array dimensions, innermost first."""
    i = ftype.find("[")
    if i < 0:
        return ftype, []
    base, suffix = ftype[:i], ftype[i:]
    if suffix.count("[") > MAX_DEPTH:  # cheap, before the regex
        raise TypedDataError(Code.TYPED_DATA_TOO_DEEP, f"{where} nests arrays deeper than {MAX_DEPTH}")
    if _DIMS.fullmatch(suffix) is None:
        raise _bad(f"{where} has a malformed array type {_clip(ftype)}")
    dims = [int(d) if d else -1 for d in suffix[1:-1].split("][")]
    if any(d > MAX_ARRAY for d in dims):
        raise TypedDataError(Code.TYPED_DATA_TOO_LARGE, f"{where} declares an array longer than {MAX_ARRAY}")
    return base, dims


class _Document:
    """One document's parsed types and the state of its (single) encoding."""

    def __init__(self, raw_types: Any, domain: dict[str, Any]) -> None:
        self.budget = MAX_COST
        if type(raw_types) is not dict:
            raise _bad("types must be a map")
        if len(raw_types) > MAX_TYPES:
            raise TypedDataError(Code.TYPED_DATA_TOO_LARGE, f"more than {MAX_TYPES} struct types")
        declared: dict[str, list[tuple[str, str]]] = {}
        total = 0
        for name, fields in raw_types.items():
            _name(name, "type name")
            if _is_atomic_name(name):
                raise _bad(f"a struct type cannot be named {name}")
            if type(fields) is list:
                total += len(fields)
                if total > MAX_TOTAL_FIELDS:
                    raise TypedDataError(
                        Code.TYPED_DATA_TOO_LARGE, f"more than {MAX_TOTAL_FIELDS} fields over all struct types"
                    )
                self.charge(COST_TYPE + COST_FIELD * len(fields))
            declared[name] = _declared_fields(name, fields)
        if "EIP712Domain" not in declared:  # derived from the domain's fields, in the standard order
            declared["EIP712Domain"] = [(n, t) for n, t in _DOMAIN_FIELDS if n in domain]
        self.declared = declared
        self.fields: dict[str, list[tuple[str, Spec]]] = {}
        self.deps: dict[str, list[str]] = {}  # struct types each one names directly
        specs: dict[str, Spec] = {}  # compiled once per distinct type string
        for name, fields in declared.items():
            compiled = []
            deps: dict[str, None] = {}
            for fname, ftype in fields:
                spec = specs.get(ftype)
                if spec is None:
                    spec = specs[ftype] = self._compile(ftype, f"{name}.{fname}")
                base = spec
                while base[0] == _ARRAY:
                    base = base[2]
                if base[0] == _STRUCT:
                    deps[base[1]] = None
                compiled.append((fname, spec))
            self.fields[name] = compiled
            self.deps[name] = list(deps)
        self._type_hash: dict[str, bytes] = {}
        self._definition: dict[str, str] = {}

    def charge(self, cost: int) -> None:
        self.budget -= cost
        if self.budget < 0:
            raise TypedDataError(Code.TYPED_DATA_TOO_LARGE, f"the document costs more than {MAX_COST} units to encode")

    def _compile(self, ftype: str, where: str) -> Spec:
        base, dims = _split_type(ftype, where)
        spec: Spec
        if base in self.declared:
            spec = (_STRUCT, base)
        elif base == "string":
            spec = (_ATOM, self._encode_string, base)
        elif base == "bytes":
            spec = (_ATOM, self._encode_bytes, base)
        else:
            encoder = _static_encoder(base, self.charge)
            if encoder is None:
                raise _bad(f"{where} has unknown type {_clip(ftype)}")
            spec = (_ATOM, encoder, base)
        for d in dims:
            spec = (_ARRAY, d, spec)
        return spec

    # encodeType and the type hash: once per struct type

    def _definition_of(self, name: str) -> str:
        d = self._definition.get(name)
        if d is None:
            d = self._definition[name] = f"{name}({','.join(f'{t} {n}' for n, t in self.declared[name])})"
        return d

    def encode_type(self, primary: str) -> str:
        found = {primary}
        stack = [primary]
        size = 0
        while stack:
            t = stack.pop()
            self.charge(COST_TYPE_VISIT)
            size += len(self._definition_of(t))
            if size >= COST_BYTES:
                self.charge(size // COST_BYTES)
                size %= COST_BYTES
            for dep in self.deps[t]:
                if dep not in found:
                    found.add(dep)
                    stack.append(dep)
        found.discard(primary)
        return self._definition_of(primary) + "".join(self._definition_of(t) for t in sorted(found))

    def type_hash(self, name: str) -> bytes:
        h = self._type_hash.get(name)
        if h is None:
            h = self._type_hash[name] = keccak256(self.encode_type(name).encode())
        return h

    # values: each one is charged before it is encoded, nesting is checked before descending

    def hash_struct(self, name: str, value: Any, depth: int) -> bytes:
        """depth: the struct and array levels above this struct (0 for the primary type)."""
        if depth >= MAX_DEPTH:
            raise TypedDataError(Code.TYPED_DATA_TOO_DEEP, f"nesting deeper than {MAX_DEPTH}")
        if type(value) is not dict:
            raise _bad(f"a {name} value must be a map")
        fields = self.fields[name]
        self.charge(COST_HASH + COST_VALUE * len(fields))
        parts = [self.type_hash(name)]
        depth += 1
        for fname, spec in fields:
            try:
                v = value[fname]
            except KeyError:
                raise _bad(f"{name}.{fname} is missing") from None
            parts.append(spec[1](v) if spec[0] == _ATOM else self._encode(spec, v, depth))
        return keccak256(b"".join(parts))

    def _encode(self, spec: Spec, value: Any, depth: int) -> bytes:
        if spec[0] == _STRUCT:
            return self.hash_struct(spec[1], value, depth)
        if depth >= MAX_DEPTH:
            raise TypedDataError(Code.TYPED_DATA_TOO_DEEP, f"nesting deeper than {MAX_DEPTH}")
        if type(value) is not list:
            raise _bad("an array value must be a list")
        n = len(value)
        if n > MAX_ARRAY:
            raise TypedDataError(Code.TYPED_DATA_TOO_LARGE, f"an array longer than {MAX_ARRAY}")
        if spec[1] >= 0 and n != spec[1]:
            raise _bad(f"an array of {n} elements where the type says {spec[1]}")
        self.charge(COST_HASH + COST_VALUE * n)
        element = spec[2]
        if n == 0:
            return _EMPTY_KECCAK
        if element[0] == _ATOM:
            encode = element[1]
            return keccak256(b"".join([encode(v) for v in value]))
        depth += 1
        return keccak256(b"".join([self._encode(element, v, depth) for v in value]))

    def _hash_dynamic(self, data: bytes) -> bytes:
        self.charge(COST_HASH + len(data) // COST_BYTES)
        return keccak256(data)

    def _encode_string(self, value: Any) -> bytes:
        if type(value) is not str:
            raise _bad("a string value must be a string")
        if len(value) > MAX_DYNAMIC_BYTES:  # a character is at least one byte: refused before encoding
            raise TypedDataError(Code.TYPED_DATA_TOO_LARGE, f"a string longer than {MAX_DYNAMIC_BYTES} bytes")
        self.charge(len(value) // COST_BYTES)  # what encoding it costs, before it is encoded
        try:
            data = value.encode()
        except UnicodeEncodeError:
            raise _bad("a string value is not valid Unicode") from None
        if len(data) > MAX_DYNAMIC_BYTES:
            raise TypedDataError(Code.TYPED_DATA_TOO_LARGE, f"a string longer than {MAX_DYNAMIC_BYTES} bytes")
        return self._hash_dynamic(data)

    def _encode_bytes(self, value: Any) -> bytes:
        return self._hash_dynamic(_as_bytes(value, "bytes", MAX_DYNAMIC_BYTES, Code.TYPED_DATA_TOO_LARGE))


def _parts(doc: Any) -> tuple[Any, dict[str, Any]]:
    if type(doc) is not dict:
        raise _bad("typed data must be a map")
    domain = doc.get("domain")
    if type(domain) is not dict:
        raise _bad("domain must be a map")
    return doc.get("types"), domain


def _check_domain_keys(domain: dict[str, Any], fields: list[tuple[str, str]]) -> None:
    """Every key of the domain map must be a field of EIP712Domain (else it would look signed and not be)."""
    names = {n for n, _ in fields}
    for key in domain:
        if key not in names:
            raise _bad(f"the domain's {_clip(key)} is not a field of EIP712Domain")


def typed_data_digest(doc: Any) -> bytes:
    """keccak256(0x19 0x01 || domainSeparator || hashStruct(message)) for an EIP-712 document."""
    raw_types, domain = _parts(doc)
    parsed = _Document(raw_types, domain)
    _check_domain_keys(domain, parsed.declared["EIP712Domain"])
    primary = doc.get("primaryType")
    if type(primary) is not str or primary not in parsed.fields:
        raise _bad("primaryType must name one of the types")
    parsed.charge(COST_VALUE)
    domain_separator = parsed.hash_struct("EIP712Domain", domain, 0)
    if primary == "EIP712Domain":
        return keccak256(b"\x19\x01" + domain_separator)
    return keccak256(b"\x19\x01" + domain_separator + parsed.hash_struct(primary, doc.get("message"), 0))


# -- the domain alone, for the key policy ---------------------------------------------------------


def typed_data_domain(doc: Any) -> dict[str, tuple[str, Any]]:
    """The fields of a document's signing domain: name -> (declared type, value), read from
    `types.EIP712Domain` (or derived from the domain as the digest derives it) and the domain
    map, without parsing the rest of the document: its cost is bounded by MAX_FIELDS.

    Raises TypedDataError when the domain is not one the digest would accept in shape: not a
    map, EIP712Domain malformed, or a domain key EIP712Domain does not declare."""
    raw_types, domain = _parts(doc)
    if type(raw_types) is not dict:
        raise _bad("types must be a map")
    if "EIP712Domain" in raw_types:
        fields = _declared_fields("EIP712Domain", raw_types["EIP712Domain"])
    else:
        fields = [(n, t) for n, t in _DOMAIN_FIELDS if n in domain]
    _check_domain_keys(domain, fields)
    return {n: (t, domain[n]) for n, t in fields if n in domain}


def domain_chain_id(doc: Any) -> int:
    """The chainId a document's signature is bound to, exactly as it is encoded.

    Strict: EIP712Domain must declare `chainId` as `uint256` and the domain's value must be an
    integer (msgpack int) in range. Strings ("1", "0x1"), booleans, negative numbers and
    absent values are refused with TypedDataError, even where the digest would accept them."""
    field = typed_data_domain(doc).get("chainId")
    if field is None:
        raise _bad("the domain has no chainId")
    ftype, value = field
    if ftype != "uint256":
        raise _bad(f"the domain's chainId is declared {_clip(ftype)}, not uint256")
    if type(value) is not int:
        raise _bad(f"the domain's chainId {_clip(value)} is not an integer")
    if not 0 <= value < 1 << 256:
        raise _bad(f"the domain's chainId {_clip(value)} is not a uint256")
    return value


def domain_verifying_contract(doc: Any) -> bytes:
    """The 20-byte verifyingContract a document's signature is bound to, exactly as encoded.

    Strict: EIP712Domain must declare `verifyingContract` as `address` and the value must be
    20 bytes or "0x" and 40 hex digits (EIP-55 checked when mixed case); else TypedDataError."""
    field = typed_data_domain(doc).get("verifyingContract")
    if field is None:
        raise _bad("the domain has no verifyingContract")
    ftype, value = field
    if ftype != "address":
        raise _bad(f"the domain's verifyingContract is declared {_clip(ftype)}, not address")
    if type(value) is bytes and len(value) == 20:
        return value
    if type(value) is str and _HEX_ADDRESS.fullmatch(value) is not None:
        addr = bytes.fromhex(value[2:])
        body = value[2:]
        if body != body.lower() and body != body.upper() and to_checksum_address(addr) != value:
            raise _bad("the domain's verifyingContract fails its EIP-55 checksum")
        return addr
    raise _bad(f"the domain's verifyingContract {_clip(value)} is not a 20-byte address")
