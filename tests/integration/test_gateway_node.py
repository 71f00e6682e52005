"""The wire contract from Node.js: tests/node/contract.mjs (kafkajs, @msgpack/msgpack, ethers v6),
written from schemas/README.md, produces requests of every scheme to the session's Kafka, signs `auth`
for a key that requires it, and verifies every result with ethers; a host and an enclave worker
process sign them. Skipped only when node is not installed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.topics import TopicLayout
from tests.conftest import ROOT, topology

NODE = shutil.which("node")
NODE_DIR = ROOT / "tests" / "node"
DIGESTS = 50


@pytest.mark.skipif(NODE is None, reason="node is not installed: the Node.js contract example needs Node.js 18+")
async def test_node_producer_and_consumer_written_from_the_contract(
    bootstrap: str, layout: TopicLayout, sock_dir: Path, tmp_path: Path
) -> None:
    assert (NODE_DIR / "node_modules" / "kafkajs").is_dir(), "run bin/setup (npm ci in tests/node) first"
    seed = os.urandom(32)
    client_pub = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    topo = topology(tmp_path, sock_dir, bootstrap, layout)
    try:
        await topo.start_kms()
        await topo.provision()
        await topo.start_enclave("enclave-node")
        await topo.start_host()
        operator = topo.operator()
        key = await operator.create_key("secp256k1", "default")
        guarded = await operator.create_key("secp256k1", "default", policy={
            "require_auth": True, "clients": {"node-client": {"scheme": "ed25519", "public_key": client_pub.hex()}}})  # fmt: skip
        ed = await operator.create_key("ed25519", "default")
        env = {**os.environ, "KAFKA_BOOTSTRAP": bootstrap, "REQUEST_TOPIC": layout.requests,
               "RESULT_TOPIC": layout.results, "KEY_ID": key["key_id"], "ADDRESS": key["address"],
               "AUTH_KEY_ID": guarded["key_id"], "AUTH_ADDRESS": guarded["address"], "CLIENT_ID": "node-client",
               "CLIENT_SEED": seed.hex(), "ED_KEY_ID": ed["key_id"], "ED_PUBLIC_KEY": ed["public_key"],
               "DIGESTS": str(DIGESTS)}  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            NODE or "node", "contract.mjs", "run", str(ROOT / "schemas" / "README.md"), env=env, cwd=NODE_DIR,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 150)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await topo.aclose()
    assert proc.returncode == 0, (out.decode()[-3000:], err.decode()[-3000:])
    summary = json.loads(out.decode().strip().splitlines()[-1])
    print(f"\nnode contract example: {summary}")
    # the digests; 2 transactions, 2 personal and 2 ed25519 messages, typed data; 3 for the auth key; 1 float
    sent = DIGESTS + 11
    assert summary["vector"] == "ok"
    assert summary["sent"] == summary["answered"] == summary["verified"] == sent, summary
    assert summary["duplicates"] == 0 and summary["wrong"] == []
    assert summary["by_status"] == {"ok": sent - 2, "rejected": 1, "error": 1}, summary
