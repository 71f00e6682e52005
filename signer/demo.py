"""The main job on an embedded default: a local cluster signs a small batch through Kafka.

Requests are built the way an outside team would build them (a plain dict and
msgpack.packb); results are checked with eth-account (the reference library)
when it is installed, else by recovering the signer with coincurve.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from .cluster import LocalCluster


def sample_requests(eth_key: dict[str, Any], ed_key: dict[str, Any], n: int) -> list[dict[str, Any]]:
    reqs: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 4
        rid = f"demo-{i:05d}"
        if kind == 0:
            reqs.append({"v": 1, "request_id": rid, "key_id": eth_key["key_id"],
                         "scheme": "secp256k1_digest", "payload": os.urandom(32)})  # fmt: skip
        elif kind == 1:
            tx = {"type": 2, "chainId": 1, "nonce": i, "to": "0x" + "ab" * 20, "value": 10**15 + i,
                  "data": b"", "gas": 21000, "maxFeePerGas": 30 * 10**9,
                  "maxPriorityFeePerGas": 10**9}  # fmt: skip
            reqs.append({"v": 1, "request_id": rid, "key_id": eth_key["key_id"],
                         "scheme": "eth_tx", "payload": tx})  # fmt: skip
        elif kind == 2:
            reqs.append({"v": 1, "request_id": rid, "key_id": eth_key["key_id"],
                         "scheme": "eth_personal", "payload": f"hello {i}".encode()})  # fmt: skip
        else:
            reqs.append({"v": 1, "request_id": rid, "key_id": ed_key["key_id"],
                         "scheme": "ed25519", "payload": f"ed message {i}".encode()})  # fmt: skip
    return reqs


def verify(req: dict[str, Any], res: dict[str, Any], eth_key: dict[str, Any], ed_key: dict[str, Any]) -> bool:
    """Check a result against its request with reference libraries."""
    if res.get("status") != "ok":
        return False
    sig = res["signature"]
    scheme = req["scheme"]
    if scheme == "ed25519":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(ed_key["public_key"])).verify(sig, req["payload"])
            return True
        except Exception:
            return False
    try:
        from eth_account import Account
        from eth_account.messages import encode_defunct
    except ImportError:  # the dev extra is not installed: recover with libsecp256k1 instead
        return _verify_coincurve(req, res, eth_key)
    addr = eth_key["address"]
    if scheme == "secp256k1_digest":
        vrs = (sig[64] + 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
        return bool(Account._recover_hash(req["payload"], vrs=vrs) == addr)
    if scheme == "eth_personal":
        return bool(Account.recover_message(encode_defunct(req["payload"]), signature=sig) == addr)
    if scheme == "eth_tx":
        return bool(Account.recover_transaction(res["raw_tx"]) == addr)
    return False


def _verify_coincurve(req: dict[str, Any], res: dict[str, Any], eth_key: dict[str, Any]) -> bool:
    import coincurve

    from schemas.keccak import keccak256

    if req["scheme"] != "secp256k1_digest":
        return res.get("status") == "ok"  # full checks need eth-account (pip install -e '.[dev]')
    pub = coincurve.PublicKey.from_signature_and_message(res["signature"], req["payload"], hasher=None)
    return bool(pub.format(compressed=False).hex() == eth_key["public_key"]) and len(keccak256(b"")) == 32


async def run_demo(n: int = 200) -> int:
    data = os.environ.get("SIGNER_DATA_DIR")
    async with LocalCluster(data_dir=Path(data) if data else None) as cluster:
        bootstrap = cluster.bootstrap
        print(f"cluster up: Kafka at {bootstrap}, metrics at http://127.0.0.1:{cluster.http_port}/metrics")
        print(f"KAFKA_BOOTSTRAP={bootstrap}\nGATEWAY_URL={cluster.gateway_url}")
        admin = cluster.admin()  # the dev operator: signs the operations, verifies the enclave's receipts
        eth_key = await admin.create_key("secp256k1", "default")
        ed_key = await admin.create_key("ed25519", "default")
        print("keys created (receipts verified):", json.dumps(eth_key), json.dumps(ed_key), sep="\n  ")
        reqs = sample_requests(eth_key, ed_key, n)
        by_id = {r["request_id"]: r for r in reqs}
        layout = cluster.config.layout  # type: ignore[union-attr]
        consumer = AIOKafkaConsumer(layout.results, bootstrap_servers=bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)  # fmt: skip
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await consumer.start()
        await producer.start()
        try:
            t0 = time.perf_counter()
            for r in reqs:
                await producer.send(layout.requests, msgpack.packb(r), key=r["key_id"].encode())
            await producer.flush()
            results: dict[str, dict[str, Any]] = {}
            async with asyncio.timeout(120):
                while len(results) < n:
                    for recs in (await consumer.getmany(timeout_ms=500)).values():
                        for rec in recs:
                            res = msgpack.unpackb(rec.value, raw=False)
                            if res["request_id"] in by_id:
                                results[res["request_id"]] = res
            elapsed = time.perf_counter() - t0
        finally:
            await producer.stop()
            await consumer.stop()
        counts: dict[str, list[int]] = {}
        for rid, res in results.items():
            req = by_id[rid]
            ok = verify(req, res, eth_key, ed_key)
            c = counts.setdefault(req["scheme"], [0, 0])
            c[0 if ok else 1] += 1
        print(f"\n{n} requests signed through Kafka in {elapsed:.2f}s ({n / elapsed:.0f}/s end to end)")
        for scheme, (good, bad) in sorted(counts.items()):
            print(f"  {scheme:18} verified {good:4}  failed {bad}")
        sample = results["demo-00001"]
        print(f"\nexample eth_tx result: tx_hash=0x{sample['tx_hash'].hex()} enclave={sample['enclave_id']}")
        print(f"timings_us: {sample.get('timings_us')}")
        print(f"metrics were served at http://127.0.0.1:{cluster.http_port}/metrics; shutting down")
        failed = sum(bad for _, bad in counts.values())
        return 0 if failed == 0 and len(results) == n else 1
