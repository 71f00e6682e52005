"""The contract for non-Python clients (schemas/README.md): its `auth` test vector is what the code
signs and verifies, and the Node.js example reproduces it (and the msgpack behaviours the contract
states) with @msgpack/msgpack."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.sign_request import canonical_encoding, sign_request_from_map
from tests.conftest import ROOT

README = ROOT / "schemas" / "README.md"
SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")  # RFC 8032 7.1 TEST 1
VECTOR_REQUEST = {
    "v": 1, "request_id": "vector-1", "key_id": "k_0123456789abcdef0123", "scheme": "eth_tx",
    "payload": {"type": 2, "chainId": 1, "nonce": 7, "to": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
                "value": "0x10000000000000000", "gas": 21000, "maxFeePerGas": 30000000000,
                "maxPriorityFeePerGas": 1000000000, "data": bytes.fromhex("deadbeef")},
    "deadline_ms": 1800000000000, "reply_topic": "sign.results",
}  # fmt: skip


def _vector() -> tuple[bytes, bytes]:
    text = README.read_text()
    start = text.index("#### Test vector")
    section = text[start : text.index("\n#", start + 1)]
    rows = re.findall(r"^\| `([0-9a-f ]+)` \|", section, re.M)
    sig = re.search(r"signature \(ed25519\):\s+`([0-9a-f]{128})`", section)
    assert rows and sig, "the test vector's table and signature"
    return bytes.fromhex("".join(r.replace(" ", "") for r in rows)), bytes.fromhex(sig.group(1))


def test_the_documented_auth_vector_is_what_the_code_signs() -> None:
    encoding, sig = _vector()
    req = sign_request_from_map(dict(VECTOR_REQUEST))  # as the enclave decodes it
    assert canonical_encoding(req, 1799999990000, bytes(range(16))) == encoding
    assert canonical_encoding(VECTOR_REQUEST, 1799999990000, bytes(range(16))) == encoding  # the gateway's path
    key = Ed25519PrivateKey.from_private_bytes(SEED)
    assert key.sign(encoding) == sig
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert f"`{pub.hex()}`" in README.read_text()  # the public key the document gives


def test_key_order_does_not_change_the_vector() -> None:
    encoding, _ = _vector()
    shuffled = {**VECTOR_REQUEST, "payload": dict(reversed(list(VECTOR_REQUEST["payload"].items())))}  # type: ignore[attr-defined]
    assert canonical_encoding(shuffled, 1799999990000, bytes(range(16))) == encoding


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_node_example_reproduces_the_vector_and_the_msgpack_facts() -> None:
    node_dir = ROOT / "tests" / "node"
    assert (node_dir / "node_modules" / "@msgpack" / "msgpack").is_dir(), "run bin/setup (npm ci in tests/node)"
    out = subprocess.run(["node", "contract.mjs", "check", str(README)], cwd=node_dir, capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["vector"] == "ok"
    facts = result["msgpack_facts"]
    # what the contract says @msgpack/msgpack does: floats above 2^53, and in BigInt mode above 2^32; wrapping
    assert facts["above_2_53"].startswith("cb") and facts["deadline_bigint_mode"].startswith("cb")
    assert facts["bigint_2_64_plus_5"] == "cf0000000000000005"
