"""Signing cost per scheme (us/op), through the enclave's whole service path (decode, policy,
auth, sign) with a hot key, next to the raw coincurve signature - in one run.

It also measures hostile EIP-712 documents, the most expensive ones a producer can send
within the 256 KiB request limit (the largest and the deepest documents the enclave
accepts, the most struct types, documents one step past a cap, a type string made to be
parsed slowly), each as a ratio to a plain `eth_tx` signing: decode, policy, EIP-712
digest and signature for the document against decode and signature for the transaction.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import coincurve
import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_worker import eip712, signers
from enclave_worker.auth import Authenticator
from enclave_worker.eip712 import TypedDataError, typed_data_digest
from enclave_worker.keyring import seal
from enclave_worker.policy import PolicyViolation, parse_policy
from enclave_worker.service import SigningService
from enclave_worker.vault import Vault
from enclave_worker.wallets import new_secret, wallet_from_secret
from schemas.errors import SchemaError
from schemas.records import KeyringEnvelope
from schemas.sign_request import MAX_REQUEST_BYTES, decode_sign_request

TYPED = {
    "types": {
        "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "chainId", "type": "uint256"}],
        "Order": [
            {"name": "maker", "type": "address"},
            {"name": "amount", "type": "uint256"},
            {"name": "tags", "type": "string[]"},
        ],
    },
    "primaryType": "Order",
    "domain": {"name": "bench", "chainId": 1},
    "message": {"maker": "0x" + "ab" * 20, "amount": 10**18, "tags": ["a", "b"]},
}
ETH_TX = {"type": 2, "chainId": 1, "nonce": 0, "to": "0x" + "11" * 20, "value": 10**16, "gas": 21000,
          "maxFeePerGas": 3 * 10**10, "maxPriorityFeePerGas": 10**9}  # fmt: skip
_BENCH_KMS_KEY = "arn:aws:kms:us-east-1:000000000000:key/bench"


class _AnyKmsKey:
    """Stands in for the enclave configuration where the vault asks for one: any KMS key."""

    def allows_kms_key(self, arn: str) -> bool:
        return True


def _vault_with_hot_keys() -> tuple[Vault, dict[str, str]]:
    vault = Vault.__new__(Vault)  # no KMS or attestation: the keys are made hot directly, for measuring only
    params = inspect.signature(Vault.__init__).parameters
    extra = {"config": _AnyKmsKey()} if "config" in params else {}
    Vault.__init__(vault, kms=None, attestation=None, **extra)  # type: ignore[arg-type]
    dek = os.urandom(32)
    env = KeyringEnvelope("bench", _BENCH_KMS_KEY, 1, b"", 0)
    aead = AESGCM(dek)
    keys = {}
    sealed = []
    for scheme in ("secp256k1", "ed25519"):
        secret = new_secret(scheme)
        w = wallet_from_secret(f"k_{scheme}", scheme, secret)
        sealed.append(seal(aead, w.key_id, env, scheme, w.public_key, w.address, secret, 0))
        keys[scheme] = w.key_id
    vault.load([env], sealed)
    vault.cache.put("bench", 1, dek)
    return vault, keys


def _requests(scheme: str, key_id: str, n: int) -> list[list[Any]]:
    payloads = {
        "secp256k1_digest": lambda i: os.urandom(32),
        "eth_personal": lambda i: f"message {i}".encode(),
        "ed25519": lambda i: f"message {i}".encode(),
        "eth_tx": lambda i: {**ETH_TX, "nonce": i},
        "eth_typed_data": lambda i: TYPED,
    }
    return [[i, msgpack.packb({"v": 1, "request_id": f"b{i}", "key_id": key_id, "scheme": scheme,
                               "payload": payloads[scheme](i)})] for i in range(n)]  # fmt: skip


def run_scheme_bench(n: int = 3000) -> dict[str, Any]:
    vault, keys = _vault_with_hot_keys()
    service = SigningService("bench", vault, Authenticator())
    priv = coincurve.PrivateKey()
    digests = [os.urandom(32) for _ in range(n)]
    t0 = time.perf_counter()
    for d in digests:
        priv.sign_recoverable(d, hasher=None)
    raw_us = (time.perf_counter() - t0) / n * 1e6
    out: dict[str, Any] = {"raw_coincurve_sign_us": round(raw_us, 1), "service_us_per_request": {}, "ratio_to_raw": {}}
    for scheme in ("secp256k1_digest", "eth_personal", "eth_tx", "eth_typed_data", "ed25519"):
        key = keys["ed25519" if scheme == "ed25519" else "secp256k1"]
        items = _requests(scheme, key, n)
        t0 = time.perf_counter()
        ready, deferred = service.sign_batch(items)
        us = (time.perf_counter() - t0) / n * 1e6
        assert not deferred and all(r[1]["status"] == "ok" for r in ready), ready[0]
        out["service_us_per_request"][scheme] = round(us, 1)
        out["ratio_to_raw"][scheme] = round(us / raw_us, 2)
    out["hostile_typed_data"] = run_hostile_typed_bench()
    return out


# -- hostile EIP-712 documents ------------------------------------------------------------------

HOSTILE_POLICY = {"schemes": ["eth_tx", "eth_typed_data"], "chain_ids": [1]}
_DOMAIN_TYPE = [{"name": "name", "type": "string"}, {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"}]  # fmt: skip
_DOMAIN = {"name": "hostile", "chainId": 1, "verifyingContract": "0x" + "cc" * 20}


def _cap(name: str, default: int) -> int:
    return int(getattr(eip712, name, default))


def _doc(types: dict[str, list[tuple[str, str]]], primary: str, message: Any) -> dict[str, Any]:
    all_types: dict[str, Any] = {"EIP712Domain": _DOMAIN_TYPE}
    all_types.update({t: [{"name": n, "type": ft} for n, ft in fs] for t, fs in types.items()})
    return {"types": all_types, "primaryType": primary, "domain": _DOMAIN, "message": message}


def request_bytes(doc: dict[str, Any], key_id: str = "k", request_id: str = "hostile") -> bytes:
    return msgpack.packb({"v": 1, "request_id": request_id, "key_id": key_id, "scheme": "eth_typed_data",
                          "payload": doc})  # fmt: skip


def _fits(doc: dict[str, Any]) -> bool:
    return len(request_bytes(doc)) <= MAX_REQUEST_BYTES


def _accepted(doc: dict[str, Any]) -> bool:
    try:
        typed_data_digest(doc)
    except TypedDataError:
        return False
    return True


def _largest_accepted(build: Callable[[int], dict[str, Any]], hi: int) -> int:
    """The largest n in [1, hi] whose document fits a request and is accepted (acceptance is monotone in n)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        doc = build(mid)
        if _fits(doc) and _accepted(doc):
            lo = mid
        else:
            hi = mid - 1
    return lo


_LEAVES: dict[str, tuple[str, Any, dict[str, list[tuple[str, str]]]]] = {
    "uint": ("uint256", 2**63, {}),
    "hex_uint": ("uint256", "0x" + "f" * 64, {}),
    "decimal_int": ("int256", "-" + "9" * 76, {}),
    "bool": ("bool", True, {}),
    "address": ("address", "0x" + "Ab" * 20, {}),
    "bytes32": ("bytes32", "0x" + "ee" * 32, {}),
    "string": ("string", "x", {}),
    "bytes": ("bytes", b"x", {}),
    "struct": ("E", {"a": 1}, {"E": [("a", "uint8")]}),
    "empty_array": ("uint8[]", [], {}),
}


def values_doc(n: int, kind: str = "uint") -> dict[str, Any]:
    """About n values of one kind: a 2-D array of n leaves (rows of at most the array cap)."""
    row = _cap("MAX_ARRAY", 1024)
    leaf_type, leaf, types = _LEAVES[kind]
    rows = [[leaf] * min(row, n - i) for i in range(0, n, row)]
    return _doc({"M": [("v", f"{leaf_type}[][]")], **types}, "M", {"v": rows})


def strings_doc(total: int) -> dict[str, Any]:
    """`total` bytes of string values, in values as large as allowed."""
    size = _cap("MAX_DYNAMIC_BYTES", 64 * 1024)
    return _doc({"M": [("v", "string[]")]}, "M", {"v": ["y" * min(size, total - i) for i in range(0, total, size)]})


def deep_doc(levels: int, fan_out: int = 1) -> dict[str, Any]:
    """A recursive struct nested `levels` times (each level a struct inside an array), fan_out children."""
    value: dict[str, Any] = {"c": [], "s": "leaf"}
    for _ in range(levels):
        value = {"c": [value] * fan_out, "s": "x"}
    return _doc({"D": [("c", "D[]"), ("s", "string")]}, "D", value)


def many_types_doc(n_types: int, fields: int, name_len: int) -> dict[str, Any]:
    """n_types struct types with long names, every one reachable from every other (so each
    encodeType names them all), every one instantiated by the message."""
    names = [f"T{i:03d}".ljust(name_len, "x") for i in range(n_types)]
    types: dict[str, list[tuple[str, str]]] = {}
    for i, name in enumerate(names):
        if i == 0:
            fs = [(f"f{j}", names[j]) for j in range(1, n_types)]  # one instance of each other type
        else:
            fs = [(f"f{j}", names[(i + j) % n_types] + "[]") for j in range(fields)]  # empty arrays: cheap values
        types[name] = fs
    message: dict[str, Any] = {f"f{j}": {f"f{k}": [] for k in range(fields)} for j in range(1, n_types)}
    return _doc(types, names[0], message)


def _many_types_within_caps(n_types: int) -> dict[str, Any]:
    fields = min(_cap("MAX_FIELDS", 64), max(1, (_cap("MAX_TOTAL_FIELDS", 1 << 20) - 3) // max(1, n_types - 1) - 1))
    name_len = _cap("MAX_NAME", 64)
    while not _fits(many_types_doc(n_types, fields, name_len)) and fields > 1:
        fields -= 1
    return many_types_doc(n_types, fields, name_len)


def long_type_string_doc(size: int) -> dict[str, Any]:
    """One field whose type is `uint8[][]...[]` with `size` bytes of brackets."""
    return _doc({"T": [("a", "uint8" + "[]" * (size // 2))]}, "T", {"a": []})


def long_int_strings_doc(n: int, digits: int = 4000) -> dict[str, Any]:
    return _doc({"M": [("v", "uint256[]")]}, "M", {"v": ["9" * digits] * n})


def duplicate_fields_doc(n: int) -> dict[str, Any]:
    """One 60 KiB string named by n fields of the same name (hashed n times by a naive encoder)."""
    return _doc({"M": [("s", "string")] * n}, "M", {"s": "x" * 60_000})


def hostile_typed_documents() -> dict[str, dict[str, Any]]:
    """The documents measured by `run_hostile_typed_bench`, sized against the enclave's caps."""
    hi = 200_000
    docs: dict[str, dict[str, Any]] = {}
    for kind in _LEAVES:
        n = _largest_accepted(lambda k, kind=kind: values_doc(k, kind), hi)  # type: ignore[misc]
        docs[f"largest_accepted_{kind}_values"] = values_doc(n, kind)
        if _fits(values_doc(n + 1, kind)):  # else the request size, not a cap, is the limit
            docs[f"refused_one_past_{kind}_values"] = values_doc(n + 1, kind)
    total = _largest_accepted(strings_doc, MAX_REQUEST_BYTES)
    docs["largest_accepted_strings"] = strings_doc(total)
    if _fits(strings_doc(total + 1)):
        docs["refused_one_past_strings"] = strings_doc(total + 1)
    levels = _largest_accepted(deep_doc, 64)
    docs["deepest_accepted"] = deep_doc(levels)
    docs["refused_one_level_too_deep"] = deep_doc(levels + 1)
    fan_out = _largest_accepted(lambda k: deep_doc(levels, k), 16)
    docs["deepest_accepted_widest"] = deep_doc(levels, fan_out)
    n_types = _largest_accepted(lambda k: many_types_doc(k, 2, _cap("MAX_NAME", 64)), _cap("MAX_TYPES", 64) - 1)
    docs["most_types_accepted"] = many_types_doc(n_types, 2, _cap("MAX_NAME", 64))
    docs["many_types_at_caps"] = _many_types_within_caps(_cap("MAX_TYPES", 64) - 1)
    docs["type_string_256kib"] = long_type_string_doc(MAX_REQUEST_BYTES - 400)
    docs["long_int_strings"] = long_int_strings_doc(60)
    docs["duplicate_fields"] = duplicate_fields_doc(_cap("MAX_FIELDS", 64))
    for name, doc in docs.items():
        assert _fits(doc), name
    return docs


def _median_seconds(fn: Callable[[], Any], repeats: int, budget_s: float = 3.0) -> float:
    times = []
    t_end = time.perf_counter() + budget_s
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and len(times) >= 1:
            break
    return statistics.median(times)


def eth_tx_sign_seconds(priv: coincurve.PrivateKey, n: int = 200) -> float:
    """Seconds for one plain eth_tx request: decode (with the transaction's parsing) and sign."""
    raws = [msgpack.packb({"v": 1, "request_id": f"t{i}", "key_id": "k", "scheme": "eth_tx",
                           "payload": {**ETH_TX, "nonce": i}}) for i in range(n)]  # fmt: skip

    def batch() -> None:
        for raw in raws:
            req = decode_sign_request(raw)
            signers.sign_eth_tx(priv, req.parsed)

    return _median_seconds(batch, 7) / n


def typed_request(raw: bytes, priv: coincurve.PrivateKey, policy: Any) -> str:
    """What the enclave does with an eth_typed_data request: decode, policy, digest, sign -> outcome code."""
    try:
        req = decode_sign_request(raw)
    except SchemaError as exc:
        return str(exc.code)
    return typed_payload(req.payload, priv, policy)


def typed_payload(payload: Any, priv: coincurve.PrivateKey, policy: Any) -> str:
    """The same after decoding: policy (before any digest), digest, sign -> outcome code."""
    try:
        if policy is not None:
            policy.check("eth_typed_data", payload, None)
        digest = typed_data_digest(payload)
    except (PolicyViolation, TypedDataError) as exc:
        return str(exc.code)
    signers.sign_digest(priv, digest)
    return "ok"


def run_hostile_typed_bench(repeats: int = 5) -> dict[str, Any]:
    """Each hostile document's cost as a ratio to one eth_tx request: the whole request (`us`,
    `ratio_to_eth_tx`) and what follows decoding (`after_decode_us`, `after_decode_ratio`):
    policy check, EIP-712 digest, signature. Decoding costs the same for any scheme."""
    priv = coincurve.PrivateKey()
    policy = parse_policy(HOSTILE_POLICY)
    tx_s = eth_tx_sign_seconds(priv)
    out: dict[str, Any] = {"eth_tx_us": round(tx_s * 1e6, 1), "documents": {}}
    worst = worst_after_decode = 0.0
    for name, doc in hostile_typed_documents().items():
        raw = request_bytes(doc)
        outcome = typed_request(raw, priv, policy)
        s = _median_seconds(lambda raw=raw: typed_request(raw, priv, policy), repeats)  # type: ignore[misc]
        payload = decode_sign_request(raw).payload
        after = _median_seconds(lambda p=payload: typed_payload(p, priv, policy), repeats)  # type: ignore[misc]
        worst, worst_after_decode = max(worst, s / tx_s), max(worst_after_decode, after / tx_s)
        out["documents"][name] = {"request_bytes": len(raw), "outcome": outcome, "us": round(s * 1e6, 1),
                                  "ratio_to_eth_tx": round(s / tx_s, 1), "after_decode_us": round(after * 1e6, 1),
                                  "after_decode_ratio": round(after / tx_s, 1)}  # fmt: skip
    out["worst_ratio_to_eth_tx"] = round(worst, 1)
    out["worst_after_decode_ratio"] = round(worst_after_decode, 1)
    return out
