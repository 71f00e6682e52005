"""Hostile EIP-712 documents cost a bounded multiple of a plain eth_tx signing, accepted or refused.

The bound is a ratio measured in the same test, never an absolute time: the cost of one
eth_typed_data request (decode, policy check, digest, signature: what the enclave does)
against one eth_tx request (decode with the transaction's parsing, signature), each the
median of several runs of CPU time. The documents are the worst a producer can send
within the 256 KiB request limit (see bench/schemes.py, which measures the same ones).
The digest's work is also bounded deterministically: keccak calls and bytes hashed.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import coincurve
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import schemes as bench
from enclave_worker import eip712, signers
from enclave_worker.eip712 import TypedDataError, typed_data_digest
from enclave_worker.policy import parse_policy
from schemas.sign_request import MAX_REQUEST_BYTES, decode_sign_request

RATIO = 20  # no request may cost more than this many eth_tx signings
CODES = {"typed_data_too_deep", "typed_data_too_large", "invalid_typed_data", "too_large"}
PRIV = coincurve.PrivateKey()
POLICY = parse_policy(bench.HOSTILE_POLICY)


def cpu_median(fn: Callable[[], Any], runs: int, budget_s: float = 5.0) -> float:
    """Median CPU seconds of fn (process time: another process's load does not count)."""
    times = []
    end = time.perf_counter() + budget_s
    gc.disable()
    try:
        for _ in range(runs):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
            if time.perf_counter() > end:
                break
    finally:
        gc.enable()
    return statistics.median(times)


_raws = [msgpack.packb({"v": 1, "request_id": f"t{i}", "key_id": "k", "scheme": "eth_tx",
                        "payload": {**bench.ETH_TX, "nonce": i}}) for i in range(100)]  # fmt: skip


def eth_tx_seconds() -> float:
    """One plain eth_tx request: the median of runs of 100, divided by 100."""

    def hundred() -> None:
        for raw in _raws:
            req = decode_sign_request(raw)
            signers.sign_eth_tx(PRIV, req.parsed)

    return cpu_median(hundred, 7) / 100


def ratio_to_eth_tx(doc: dict[str, Any], attempts: int = 3) -> tuple[float, str]:
    """(cost of the document / cost of an eth_tx request, the request's outcome).

    The document's cost is what the enclave does after decoding the request: policy check,
    digest, signature (decoding 256 KiB of msgpack costs the same whatever the scheme).
    The lowest of a few attempts, each measuring both sides, so a burst of noise is not a result."""
    raw = bench.request_bytes(doc)
    outcome = bench.typed_request(raw, PRIV, POLICY)
    if outcome == "too_large":  # refused while decoding (too many maps and lists): that is its whole cost
        work: Callable[[], Any] = lambda: bench.typed_request(raw, PRIV, POLICY)  # noqa: E731
    else:
        payload = decode_sign_request(raw).payload
        work = lambda: bench.typed_payload(payload, PRIV, POLICY)  # noqa: E731
    best = float("inf")
    for _ in range(attempts):
        tx = eth_tx_seconds()
        typed = cpu_median(work, 7)
        best = min(best, typed / tx)
        if best < RATIO / 2:
            break
    return best, outcome


def doc_of(types: dict[str, list[tuple[str, str]]], primary: str, message: Any) -> dict[str, Any]:
    return bench._doc(types, primary, message)


def size(doc: dict[str, Any]) -> int:
    return len(bench.request_bytes(doc))


# -- the benchmark's worst cases -------------------------------------------------------------------

HOSTILE = bench.hostile_typed_documents()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_worst_case_documents_cost_a_bounded_multiple_of_an_eth_tx(name: str) -> None:
    ratio, outcome = ratio_to_eth_tx(HOSTILE[name])
    if name.startswith(("largest_accepted", "deepest_accepted", "most_types_accepted")):
        assert outcome == "ok", outcome
    else:
        assert outcome in CODES, outcome
    assert ratio < RATIO, f"{name}: {ratio:.1f} eth_tx signings ({outcome})"


# -- named attacks ---------------------------------------------------------------------------------


def _260kb(build: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """The largest build(n) whose request is at most 260,000 bytes (n doubled, then bisected)."""
    hi = 1
    while size(build(hi)) <= 260_000:
        hi *= 2
    lo = hi // 2
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if size(build(mid)) <= 260_000:
            lo = mid
        else:
            hi = mid
    return build(lo)


ATTACKS_260KB: dict[str, Callable[[int], dict[str, Any]]] = {
    # the request that held an enclave's event loop for seconds: one type string of brackets
    "type string of brackets": lambda n: bench.long_type_string_doc(n),
    "one array per value": lambda n: doc_of({"M": [("v", "uint8[][]")]}, "M", {"v": [[]] * n}),
    "values past every cap": lambda n: bench.values_doc(n, "uint"),
    "integer strings": lambda n: doc_of({"M": [("v", "uint256[]")]}, "M", {"v": ["0x" + "f" * 64] * n}),
    "huge strings": lambda n: doc_of({"M": [("v", "string[]")]}, "M", {"v": ["s" * 60_000] * 4 + ["s" * n]}),
    "long names": lambda n: doc_of({"T" * 64: [(f"f{i}" + "x" * n, "uint256") for i in range(64)]}, "T" * 64, {}),
    "one field per struct type, all types": lambda n: doc_of(
        {f"T{i}": [(f"f{j}", f"T{(i + j + 1) % 64}[]") for j in range(n)] for i in range(64)}, "T0", {}
    ),
}


@pytest.mark.parametrize("name", sorted(ATTACKS_260KB))
def test_a_260_kb_request_is_refused_within_the_bound(name: str) -> None:
    doc = _260kb(ATTACKS_260KB[name])
    assert 200_000 < size(doc) <= min(260_000, MAX_REQUEST_BYTES)
    ratio, outcome = ratio_to_eth_tx(doc)
    assert outcome in CODES, outcome
    assert ratio < RATIO, f"{name}: {ratio:.1f} eth_tx signings ({outcome})"


def test_thousands_of_types_referencing_each_other() -> None:
    names = [f"T{i}" for i in range(3000)]
    types = {n: [("next", names[(i + 1) % 3000]), ("all", names[(i * 7) % 3000] + "[]")] for i, n in enumerate(names)}
    ratio, outcome = ratio_to_eth_tx(doc_of(types, "T0", {"next": {}, "all": []}))
    assert outcome in ("typed_data_too_large", "too_large") and ratio < RATIO
    # as many as the caps allow, each one's encodeType naming all the others, every one hashed
    ratio, outcome = ratio_to_eth_tx(bench.many_types_doc(eip712.MAX_TYPES - 1, 4, eip712.MAX_NAME))
    assert outcome == "typed_data_too_large" and ratio < RATIO


def test_deep_nesting_is_refused_before_it_is_descended() -> None:
    # (msgpack itself nests at most 511 levels)
    deep_struct = bench.deep_doc(240)
    deep_array = doc_of({"M": [("v", "uint8" + "[]" * 40)]}, "M", {"v": []})
    nested: Any = []
    for _ in range(480):
        nested = [nested]
    deep_value = doc_of({"M": [("v", "uint8[]")]}, "M", {"v": nested})
    for doc in (deep_struct, deep_array):
        ratio, outcome = ratio_to_eth_tx(doc)
        assert outcome == "typed_data_too_deep" and ratio < RATIO
    ratio, outcome = ratio_to_eth_tx(deep_value)
    assert outcome == "invalid_typed_data" and ratio < RATIO  # a list where a uint8 goes


def test_huge_arrays_are_refused_before_their_elements_are_encoded() -> None:
    struct_rows = doc_of({"M": [("v", "E[]")], "E": [("a", "uint8"), ("b", "string")]}, "M",
                         {"v": [{"a": 1, "b": "x"}] * 1024})  # fmt: skip
    too_long = doc_of({"M": [("v", "bool[]")]}, "M", {"v": [True] * 60_000})
    fixed = doc_of({"M": [("v", "bool[99999]")]}, "M", {"v": []})
    for doc in (struct_rows, too_long, fixed):
        ratio, outcome = ratio_to_eth_tx(doc)
        assert outcome == "typed_data_too_large" and ratio < RATIO


# -- the digest's work is linear, deterministically ------------------------------------------------


class Meter:
    """Counts the keccak calls and bytes the digest hashes."""

    def __init__(self) -> None:
        self.calls = self.bytes = 0

    def __call__(self, data: bytes) -> bytes:
        self.calls += 1
        self.bytes += len(data)
        return bytes(32)


@pytest.fixture
def meter(monkeypatch: pytest.MonkeyPatch) -> Iterator[Meter]:
    m = Meter()
    monkeypatch.setattr(eip712, "keccak256", m)
    yield m


MAX_CALLS = eip712.MAX_COST // eip712.COST_HASH + eip712.MAX_TYPES + 4
# bytes hashed: string/bytes values and encodeType strings (COST_BYTES a unit), 32 per value encoded,
# and each type hash's remainder under a unit
MAX_HASHED = (eip712.COST_BYTES + 32) * eip712.MAX_COST + eip712.MAX_TYPES * (eip712.COST_BYTES + 200) + 1024


def test_a_value_named_many_times_is_not_hashed_many_times(meter: Meter) -> None:
    with pytest.raises(TypedDataError) as info:
        typed_data_digest(bench.duplicate_fields_doc(64))  # one 60 KiB string under 64 fields of one name
    assert info.value.code == "invalid_typed_data"
    assert meter.bytes < 100_000


def test_a_document_of_many_types_hashes_each_encode_type_within_the_budget(meter: Meter) -> None:
    doc = bench.many_types_doc(40, 3, eip712.MAX_NAME)
    with pytest.raises(TypedDataError):
        typed_data_digest(doc)
    assert meter.bytes <= MAX_HASHED and meter.calls <= MAX_CALLS


VALID_ATOMIC = ["uint256", "uint8", "int64", "bool", "address", "bytes32", "bytes1", "string", "bytes"]
BAD_ATOMIC = ["uint", "int7", "bytes33", "uint0", "Bogus", "", "string[", "]"]
VALID_DIMS = ["[]", "[]", "[1]", "[2]"]
BAD_DIMS = ["[1024]", "[0]", "[x]", "[99999]"]
LEAVES = {"uint256": 2**255, "uint8": 255, "int64": -1, "bool": True, "address": b"\x11" * 20, "bytes32": b"\x22" * 32,
          "bytes1": "0x01", "bytes": b"b" * 10}  # fmt: skip
JUNK = [None, True, 0, -1, 2**64 - 1, "", "0x", "x" * 100, b"", {}, [], [[]], {"a": 1}]


@st.composite
def hostile_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Random type graphs (cycles, deep array suffixes, many fields, sometimes unknown or malformed
    types), with values that follow the types as deep as they go, sometimes wandering off them."""
    rnd = draw(st.randoms(use_true_random=False))
    bad_types = draw(st.sampled_from([0.0, 0.0, 0.02, 0.2]))
    junk_rate = draw(st.sampled_from([0.0, 0.0, 0.001, 0.05]))
    n = rnd.choice([rnd.randint(1, 6), rnd.randint(1, 80)])
    names = [f"S{i}" for i in range(n)]

    def field_type() -> str:
        base = rnd.choice(BAD_ATOMIC) if rnd.random() < bad_types else rnd.choice([*VALID_ATOMIC, *names])
        dims = rnd.choice([0, 0, 1, 2, 3, rnd.randint(0, 20)])
        return base + "".join(rnd.choice(BAD_DIMS) if rnd.random() < bad_types else rnd.choice(VALID_DIMS)
                              for _ in range(dims))  # fmt: skip

    types = {name: [(f"f{j}", field_type()) for j in range(rnd.choice([rnd.randint(0, 6), rnd.randint(0, 70)]))]
             for name in names}  # fmt: skip
    budget = [rnd.randint(10, 4000)]

    def value(t: str, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0 or depth > 40 or rnd.random() < junk_rate:
            return rnd.choice(JUNK)
        if t.endswith("]") and "[" in t:
            inner, inside = t[: t.rindex("[")], t[t.rindex("[") + 1 : -1]
            count = int(inside) if inside.isdigit() else rnd.randint(0, 40)
            return [value(inner, depth + 1) for _ in range(min(count, 60))]
        if t in types:
            return {f: value(ft, depth + 1) for f, ft in types[t]}
        if t == "string":
            return "s" * rnd.randint(0, 300)
        return LEAVES.get(t, rnd.choice(JUNK))

    primary = rnd.choice(names)
    return doc_of(types, primary, value(primary, 0))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile_documents())
def test_random_hostile_documents_are_refused_with_a_code_or_hashed_within_the_budget(doc: dict[str, Any]) -> None:
    meter = Meter()
    original = eip712.keccak256
    eip712.keccak256 = meter  # type: ignore[assignment]
    try:
        typed_data_digest(doc)
    except TypedDataError as exc:
        assert exc.code in CODES
    finally:
        eip712.keccak256 = original
    assert meter.calls <= MAX_CALLS, meter.calls
    assert meter.bytes <= MAX_HASHED, meter.bytes
