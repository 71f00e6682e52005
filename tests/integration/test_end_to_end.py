"""The first slice end to end, with real parts: Kafka, an enclave worker process on a Unix socket,
a host worker process, and the `signer keys create` CLI. Requests are built as an outside team
would (a dict and msgpack.packb); every request id is counted; signatures are verified with
eth-account, pyrlp and cryptography.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import rlp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from eth_account import Account
from eth_account.messages import encode_defunct

from broker.topics import TopicLayout
from schemas.dlq import DlqRecord
from signer.topology import ChildProcess
from tests.conftest import ROOT, committed_and_end_offsets, topology


@dataclass
class Cluster:
    bootstrap: str
    layout: TopicLayout
    env: dict[str, str]  # the host's settings and the dev operator's: what `signer keys` needs
    host: ChildProcess
    http_port: int


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signer", *args], env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip


@pytest.fixture
async def cluster(bootstrap: str, layout: TopicLayout, sock_dir: Path, tmp_path: Path) -> AsyncIterator[Cluster]:
    topo = topology(tmp_path, sock_dir, bootstrap, layout)
    try:
        await topo.start_kms()
        dev = await topo.provision()
        await topo.start_enclave("enclave-e2e")
        host = await topo.start_host(settings={"SIGNER_MAX_BATCH": "64"})
        yield Cluster(bootstrap, layout, {**host.config.to_env(), **dev.cli_env()}, host.process, host.port)
    finally:
        await topo.aclose()


def create_key(c: Cluster, scheme: str) -> dict[str, Any]:
    out = cli(c.env, "keys", "create", "--scheme", scheme)
    assert out.returncode == 0, out.stderr
    key = json.loads(out.stdout)
    assert key["scheme"] == scheme and key["key_id"] and key["public_key"]
    return key


def _vrs(sig: bytes, offset: int = 27) -> tuple[int, int, int]:
    return sig[64] + offset, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")


async def _produce(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in values:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def _collect(
    bootstrap: str, topics: list[str], want: set[str], field: str, timeout: float = 90
) -> dict[str, list[dict[str, Any]]]:
    """Consume until every wanted id was seen; return all records by id (duplicates included)."""
    import asyncio

    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    seen: dict[str, list[dict[str, Any]]] = {}
    try:
        async with asyncio.timeout(timeout):
            while not want <= set(seen):
                for recs in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in recs:
                        m = msgpack.unpackb(rec.value, raw=False)
                        m["_topic"], m["_key"] = rec.topic, rec.key
                        seen.setdefault(m.get(field), []).append(m)
            # a short grace read so a duplicate published right after would be seen too
            for recs in (await consumer.getmany(timeout_ms=1000)).values():
                for rec in recs:
                    m = msgpack.unpackb(rec.value, raw=False)
                    m["_topic"], m["_key"] = rec.topic, rec.key
                    seen.setdefault(m.get(field), []).append(m)
    finally:
        await consumer.stop()
    return seen


def _eth_tx(i: int, tx_type: int) -> dict[str, Any]:
    tx: dict[str, Any] = {"type": tx_type, "chainId": 11155111, "nonce": i, "to": bytes([i % 256]) * 20,
                          "value": 10**18 + i, "data": b"\xa9\x05\x9c\xbb" + bytes(64), "gas": 60000}  # fmt: skip
    if tx_type == 2:
        tx.update(maxFeePerGas=40 * 10**9, maxPriorityFeePerGas=2 * 10**9)
    else:
        tx["gasPrice"] = 20 * 10**9
    if tx_type == 1:
        tx["accessList"] = [{"address": "0x" + "33" * 20, "storageKeys": ["0x" + "00" * 31 + "01"]}]
    return tx


async def test_requests_from_a_plain_msgpack_producer_are_signed_and_verified(cluster: Cluster) -> None:
    c = cluster
    eth_a, eth_b, ed = create_key(c, "secp256k1"), create_key(c, "secp256k1"), create_key(c, "ed25519")
    reply_topic = c.layout.results + ".custom"
    admin = AIOKafkaAdminClient(bootstrap_servers=c.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(reply_topic, 1, 1)])
    await admin.close()

    requests: dict[str, dict[str, Any]] = {}
    for i in range(240):
        key = eth_a if i % 2 else eth_b
        kind = i % 6
        rid = f"e2e-{i}"
        if kind == 0:
            m = {
                "v": 1,
                "request_id": rid,
                "key_id": key["key_id"],
                "scheme": "secp256k1_digest",
                "payload": os.urandom(32),
            }
        elif kind in (1, 2, 3):
            m = {
                "v": 1,
                "request_id": rid,
                "key_id": key["key_id"],
                "scheme": "eth_tx",
                "payload": _eth_tx(i, kind - 1),
            }
        elif kind == 4:
            m = {
                "v": 1,
                "request_id": rid,
                "key_id": key["key_id"],
                "scheme": "eth_personal",
                "payload": f"msg {i}".encode(),
            }
        else:
            m = {"v": 1, "request_id": rid, "key_id": ed["key_id"], "scheme": "ed25519", "payload": os.urandom(50)}
        if i % 40 == 7:
            m["reply_topic"] = reply_topic
        requests[rid] = m
    refused = {
        "e2e-expired": {"v": 1, "request_id": "e2e-expired", "key_id": eth_a["key_id"], "scheme": "secp256k1_digest",
                        "payload": b"\1" * 32, "deadline_ms": int(time.time() * 1000) - 1},
        "e2e-unknown-key": {"v": 1, "request_id": "e2e-unknown-key", "key_id": "k_missing", "scheme": "eth_personal",
                            "payload": b"x"},
    }  # fmt: skip
    garbage = [
        b"\xc1not msgpack",
        msgpack.packb({"v": 1, "request_id": "e2e-bad-scheme", "key_id": "k", "scheme": "rsa", "payload": b""}),
    ]
    values = [(m["key_id"].encode(), msgpack.packb(m)) for m in [*requests.values(), *refused.values()]]
    values += [(b"junk", g) for g in garbage]
    await _produce(c.bootstrap, c.layout.requests, values)

    # invalid input that names its request is answered too (and kept in the DLQ): its caller hears of it
    want = set(requests) | set(refused) | {"e2e-bad-scheme"}
    results = await _collect(c.bootstrap, [c.layout.results, reply_topic], want, "request_id")
    dlq = await _collect(c.bootstrap, [c.layout.dlq], {"malformed", "unknown_scheme"}, "reason")

    # every request id has exactly one result, on the topic it asked for, keyed by request_id
    assert set(results) == want
    assert all(len(v) == 1 for v in results.values()), {k: len(v) for k, v in results.items() if len(v) != 1}
    for rid, m in requests.items():
        res = results[rid][0]
        assert res["_topic"] == m.get("reply_topic", c.layout.results)
        assert res["_key"] == rid.encode()
        assert res["status"] == "ok", res
        assert res["enclave_id"] == "enclave-e2e"
        addr = (
            next(k for k in (eth_a, eth_b) if k["key_id"] == m["key_id"])["address"]
            if m["scheme"] != "ed25519"
            else None
        )
        sig = res["signature"]
        if m["scheme"] == "secp256k1_digest":
            assert sig[64] in (0, 1)
            assert Account._recover_hash(m["payload"], vrs=_vrs(sig)) == addr
        elif m["scheme"] == "eth_personal":
            assert sig[64] in (27, 28)
            assert Account.recover_message(encode_defunct(m["payload"]), signature=sig) == addr
        elif m["scheme"] == "ed25519":
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(ed["public_key"])).verify(sig, m["payload"])
        else:
            raw, tx = res["raw_tx"], m["payload"]
            assert Account.recover_transaction(raw) == addr
            from eth_utils import keccak

            assert res["tx_hash"] == keccak(raw)
            if tx["type"] == 0:
                fields = rlp.decode(raw)
                nonce, _gas_price, gas, to, value, data = fields[:6]
                v = int.from_bytes(fields[6], "big")
                assert v in (tx["chainId"] * 2 + 35, tx["chainId"] * 2 + 36)
            else:
                assert raw[0] == tx["type"]
                fields = rlp.decode(raw[1:])
                assert int.from_bytes(fields[0], "big") == tx["chainId"]
                nonce = fields[1]
                if tx["type"] == 2:
                    assert int.from_bytes(fields[2], "big") == tx["maxPriorityFeePerGas"]
                    assert int.from_bytes(fields[3], "big") == tx["maxFeePerGas"]
                    gas, to, value, data = fields[4:8]
                else:
                    assert int.from_bytes(fields[2], "big") == tx["gasPrice"]
                    gas, to, value, data = fields[3:7]
            assert int.from_bytes(nonce, "big") == tx["nonce"]
            assert int.from_bytes(gas, "big") == tx["gas"]
            assert to == tx["to"] and data == tx["data"]
            assert int.from_bytes(value, "big") == tx["value"]
    assert results["e2e-expired"][0]["status"] == "expired"
    assert results["e2e-expired"][0]["error"]["code"] == "deadline_passed"
    assert "signature" not in results["e2e-expired"][0]
    assert results["e2e-unknown-key"][0]["error"]["code"] == "unknown_key"
    bad_scheme = results["e2e-bad-scheme"][0]
    assert (bad_scheme["status"], bad_scheme["error"]["code"], bad_scheme["key_id"]) == ("error", "unknown_scheme", "k")

    # undecodable input went to the DLQ with its original bytes and a reason
    bad = DlqRecord.decode(msgpack.packb({k: v for k, v in dlq["malformed"][0].items() if not k.startswith("_")}))
    assert bad.original == garbage[0] and bad.topic == c.layout.requests and bad.original_key == b"junk"
    assert dlq["unknown_scheme"][0]["request_id"] == "e2e-bad-scheme"

    # metrics and health endpoints of the running host
    base = f"http://127.0.0.1:{c.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert (await r.json())["status"] == "alive"
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with http.get(f"{base}/metrics") as r:
            metrics = await r.text()
    assert 'signer_requests_total{scheme="eth_tx",status="ok"} 120.0' in metrics
    assert 'signer_dlq_records_total{reason="malformed"} 1.0' in metrics

    # graceful shutdown commits everything it published: no lag left for the group
    assert c.host.stop() == 0
    committed, ends = await committed_and_end_offsets(c.bootstrap, c.env["SIGNER_GROUP_ID"], c.layout)
    assert sum(ends.values()) == len(values)
    for tp, end in ends.items():
        assert committed[tp] == end, (tp, committed[tp], end)
