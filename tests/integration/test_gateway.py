"""The HTTP gateway with real clients: a cluster (Kafka, dev KMS, an enclave worker process, a host
process) and `python -m signer gateway` processes in front of it. web3.py signs through the
gateway's JSON-RPC as it would through Web3Signer, and eth-account verifies every signature;
hostile HTTP (oversized, slow, malformed, unknown) gets clear errors while the gateway keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data

from broker.topics import TopicLayout
from signer.topology import ChildProcess, Topology
from tests.conftest import topology

TOKEN, BOB_TOKEN = "alice-" + uuid.uuid4().hex, "bob-" + uuid.uuid4().hex


@dataclass
class GatewayRig:
    topo: Topology
    url: str
    gateway: ChildProcess
    keys: list[dict[str, Any]]  # secp256k1, secp256k1, ed25519
    clients_file: Path

    @property
    def address(self) -> str:
        return str(self.keys[0]["address"])

    def headers(self, token: str = TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
async def rig(bootstrap: str, layout: TopicLayout, sock_dir: Path, tmp_path: Path) -> AsyncIterator[GatewayRig]:
    topo = topology(tmp_path, sock_dir, bootstrap, layout)
    try:
        await topo.start_kms()
        await topo.provision()
        await topo.start_enclave("enclave-gw")
        await topo.start_host(settings={"SIGNER_MAX_BATCH": "64"})
        admin = topo.operator()
        keys = [await admin.create_key("secp256k1", "default"), await admin.create_key("secp256k1", "default"),
                await admin.create_key("ed25519", "default")]  # fmt: skip
        clients = tmp_path / "clients.json"
        clients.write_text(json.dumps({
            "alice": {"token_sha256": _sha(TOKEN)},
            "bob": {"token_sha256": _sha(BOB_TOKEN), "keys": [keys[1]["address"]]},
        }))  # fmt: skip
        gw = await topo.start_gateway(settings={"SIGNER_GATEWAY_CLIENTS": str(clients),
                                                "SIGNER_GATEWAY_BODY_TIMEOUT_MS": "1000",
                                                "SIGNER_GATEWAY_CHAIN_ID": "11155111"})  # fmt: skip
        yield GatewayRig(topo, gw.address, gw, keys, clients)
    finally:
        await topo.aclose()


def _web3(rig: GatewayRig, token: str = TOKEN) -> Any:
    from web3 import Web3

    return Web3(Web3.HTTPProvider(rig.url, request_kwargs={"headers": rig_headers(token), "timeout": 30}))


def rig_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


TYPED = {
    "types": {
        "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                         {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
        "Person": [{"name": "name", "type": "string"}, {"name": "wallet", "type": "address"}],
        "Mail": [{"name": "from", "type": "Person"}, {"name": "to", "type": "Person"}, {"name": "contents", "type": "string"}],
    },
    "primaryType": "Mail",
    "domain": {"name": "Ether Mail", "version": "1", "chainId": 1, "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC"},
    "message": {"from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
                "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"}, "contents": "Hello, Bob!"},
}  # fmt: skip


async def test_web3py_signs_through_the_gateway_and_eth_account_verifies(rig: GatewayRig) -> None:
    def run() -> None:
        from web3 import Web3

        w3 = _web3(rig)
        assert [a.lower() for a in w3.eth.accounts] == sorted(k["address"].lower() for k in rig.keys[:2])
        raw_accounts = w3.provider.make_request("eth_accounts", [])["result"]
        assert raw_accounts == sorted(k["address"].lower() for k in rig.keys[:2])  # Web3Signer: lower-case, sorted
        sender = Web3.to_checksum_address(rig.address)
        for tx in (
            {"from": sender, "to": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "value": 10**16, "gas": 21000,
             "maxFeePerGas": 30 * 10**9, "maxPriorityFeePerGas": 10**9, "nonce": 7, "chainId": 11155111},
            {"from": sender, "to": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "value": 1, "gas": 21000,
             "gasPrice": 10**9, "nonce": 8},  # no chainId: SIGNER_GATEWAY_CHAIN_ID
        ):  # fmt: skip
            rpc_tx = {k: (hex(v) if isinstance(v, int) else v) for k, v in tx.items()}
            raw = w3.provider.make_request("eth_signTransaction", [rpc_tx])["result"]
            assert isinstance(raw, str) and raw.startswith("0x") and raw == raw.lower()
            assert Account.recover_transaction(raw) == sender
        # eth_sign: EIP-191 personal message, v 27/28, lower-case hex
        sig = w3.eth.sign(sender, text="hello gateway")
        assert sig[64] in (27, 28)
        assert Account.recover_message(encode_defunct(text="hello gateway"), signature=sig) == sender
        sig = w3.eth.sign(sender, hexstr="0xdeadbeef")
        assert Account.recover_message(encode_defunct(hexstr="0xdeadbeef"), signature=sig) == sender
        # typed data (web3.py sends eth_signTypedData, Web3Signer's name; _v4 is the same)
        sig = w3.eth.sign_typed_data(sender, TYPED)
        assert Account.recover_message(encode_typed_data(full_message=TYPED), signature=sig) == sender
        res = w3.provider.make_request("eth_signTypedData_v4", [rig.address.lower(), json.dumps(TYPED)])
        assert Account.recover_message(encode_typed_data(full_message=TYPED), signature=res["result"]) == sender

    await asyncio.to_thread(run)


async def test_native_api_keys_sign_json_and_msgpack(rig: GatewayRig) -> None:
    async with aiohttp.ClientSession(headers=rig.headers()) as http:
        async with http.get(f"{rig.url}/v1/keys") as r:
            assert r.status == 200
            listed = {k["key_id"]: k for k in (await r.json())["keys"]}
        for k in rig.keys:
            assert listed[k["key_id"]]["public_key"] == "0x" + k["public_key"]
            assert listed[k["key_id"]].get("address") == k.get("address") and "policy" not in listed[k["key_id"]]
        digest = os.urandom(32)
        body = {"key_id": rig.keys[0]["key_id"], "scheme": "secp256k1_digest", "payload": "0x" + digest.hex()}
        async with http.post(f"{rig.url}/v1/sign", json=body, headers={"Idempotency-Key": "idem-1"}) as r:
            assert r.status == 200, await r.text()
            res = await r.json()
        assert res["status"] == "ok" and res["request_id"] == "idem-1"
        sig = bytes.fromhex(res["signature"][2:])
        assert (
            Account._recover_hash(digest, vrs=(sig[64], int.from_bytes(sig[:32]), int.from_bytes(sig[32:64])))
            == rig.address
        )
        # the same Idempotency-Key again: the same signature (RFC 6979), answered once more
        async with http.post(f"{rig.url}/v1/sign", json=body, headers={"Idempotency-Key": "idem-1"}) as r:
            assert (await r.json())["signature"] == res["signature"]
        # msgpack in, msgpack out
        req = {"v": 1, "key_id": rig.keys[2]["key_id"], "scheme": "ed25519", "payload": b"ed message"}
        async with http.post(f"{rig.url}/v1/sign", data=msgpack.packb(req),
                             headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"}) as r:  # fmt: skip
            assert r.status == 200 and r.content_type == "application/msgpack"
            out = msgpack.unpackb(await r.read())
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        Ed25519PublicKey.from_public_bytes(bytes.fromhex(rig.keys[2]["public_key"])).verify(
            out["signature"], b"ed message"
        )
        # a refusal from the enclave is a SignResult too (here: an ed25519 key asked for eth_personal)
        bad = {"key_id": rig.keys[2]["key_id"], "scheme": "eth_personal", "payload": "0x00"}
        async with http.post(f"{rig.url}/v1/sign", json=bad) as r:
            res = await r.json()
            assert r.status == 200 and res["status"] == "rejected" and res["error"]["code"] == "scheme_mismatch"
        # invalid input: the contract's code, before anything is sent
        async with http.post(f"{rig.url}/v1/sign", json={**body, "payload": "0x00"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_payload"
        async with http.post(f"{rig.url}/v1/sign", json={"key_id": "k_1", "scheme": "nope", "payload": "0x"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "unknown_scheme"
        # Web3Signer's eth1 sign: keccak256(data), by public key or address, text/plain, v 27/28
        for ident in ("0x" + rig.keys[0]["public_key"], rig.address):
            async with http.post(f"{rig.url}/api/v1/eth1/sign/{ident}", json={"data": "0x48656c6c6f"}) as r:
                assert r.status == 200 and r.content_type == "text/plain", await r.text()
                sig = bytes.fromhex((await r.text())[2:])
            from eth_utils import keccak

            assert sig[64] in (27, 28)
            assert Account._recover_hash(keccak(b"Hello"), signature=sig) == rig.address
        async with http.post(f"{rig.url}/api/v1/eth1/sign/0x{'11' * 20}", json={"data": "0x00"}) as r:
            assert r.status == 404


async def test_authentication_and_client_key_scopes(rig: GatewayRig) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{rig.url}/upcheck") as r:
            assert r.status == 200 and await r.text() == "OK"
        async with http.get(f"{rig.url}/healthcheck") as r:
            assert r.status == 200 and (await r.json())["status"] == "UP"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
            async with http.get(f"{rig.url}/v1/keys", headers=headers) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
            async with http.post(
                rig.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_accounts"}, headers=headers
            ) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == -40100
        bob = {"Authorization": f"Bearer {BOB_TOKEN}"}
        async with http.post(rig.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_accounts"}, headers=bob) as r:
            assert (await r.json())["result"] == [rig.keys[1]["address"].lower()]
        call = {"jsonrpc": "2.0", "id": 2, "method": "eth_sign", "params": [rig.address, "0x01"]}
        async with http.post(rig.url, json=call, headers=bob) as r:
            out = await r.json()
            assert r.status == 200 and out["error"]["code"] == -32000, out
            assert out["error"]["message"] == "No unlocked account matches the Sender"
        body = {"key_id": rig.keys[0]["key_id"], "scheme": "eth_personal", "payload": "0x01"}
        async with http.post(f"{rig.url}/v1/sign", json=body, headers=bob) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"


async def _raw_http(url: str, request: bytes, *, read: bool = True) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), 30) if read else b""
        status = int(data.split(b" ", 2)[1]) if data else 0
        return status, data
    finally:
        writer.close()


async def test_hostile_http_gets_clear_errors_and_the_gateway_keeps_serving(rig: GatewayRig) -> None:
    auth = rig.headers()
    rpc = rig.url
    async with aiohttp.ClientSession(headers=auth) as http:

        async def check(method: str, path: str, status: int, code: Any, **kw: Any) -> None:
            async with http.request(method, f"{rig.url}{path}", **kw) as r:
                body = await r.json()
                assert r.status == status, (path, r.status, body)
                got = body["error"]["code"]
                assert got == code, (path, body)

        # oversized bodies: declared, and streamed without a length
        await check("POST", "/v1/sign", 413, "too_large", data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                    headers={"Content-Type": "application/json"})  # fmt: skip

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b" " * 65536

        await check("POST", "/v1/sign", 413, "too_large", data=chunks(), headers={"Content-Type": "application/json"})
        # bad JSON, wrong shapes, wrong content types, unknown paths and methods
        await check(
            "POST", "/v1/sign", 400, "malformed", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        await check(
            "POST", "/v1/sign", 400, "malformed", data=b"[" * 100_000, headers={"Content-Type": "application/json"}
        )
        await check("POST", "/v1/sign", 400, "not_a_map", json=[1, 2])
        await check("POST", "/v1/sign", 400, "missing_field", json={"scheme": "eth_personal", "payload": "0x00"})
        await check("POST", "/v1/sign", 400, "wrong_type", json={"key_id": "k", "scheme": "eth_personal", "payload": 5})
        await check("POST", "/v1/sign", 415, "unsupported_media_type", data=b"a=b",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        await check("POST", "/v1/sign", 400, "malformed", data=b"\xc1", headers={"Content-Type": "application/msgpack"})
        await check("GET", "/v1/sign", 405, "method_not_allowed")
        await check("DELETE", "/v1/keys", 405, "method_not_allowed")
        await check("GET", "/nope", 404, "not_found")
        await check("POST", "/", 400, -32700, data=b"{oops", headers={"Content-Type": "application/json"})
        await check(
            "POST", "/", 200, -32601, json={"jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction", "params": []}
        )
        await check("POST", "/", 400, -32600, json={"id": 1, "method": "eth_accounts"})
        await check(
            "POST", "/", 400, -32602, json={"jsonrpc": "2.0", "id": 1, "method": "eth_sign", "params": [rig.address]}
        )
        await check("POST", "/", 400, -32602, json={"jsonrpc": "2.0", "id": 1, "method": "eth_signTransaction",
                                                    "params": [{"from": rig.address, "gas": "0x5208", "chainId": "0x1"}]})  # fmt: skip
        await check("POST", "/", 400, -32602, json={"jsonrpc": "2.0", "id": 1, "method": "eth_signTypedData_v4",
                                                    "params": [rig.address, {"types": {}, "domain": {}}]})  # fmt: skip
        # a batch: answered element by element
        async with http.post(rpc, json=[{"jsonrpc": "2.0", "id": 1, "method": "eth_accounts"},
                                        {"jsonrpc": "2.0", "id": 2, "method": "nope"}]) as r:  # fmt: skip
            answers = await r.json()
            assert r.status == 200 and answers[0]["id"] == 1 and "result" in answers[0]
            assert answers[1]["error"]["code"] == -32601
    # a slow client: the body does not arrive within SIGNER_GATEWAY_BODY_TIMEOUT_MS (1 s here)
    head = (f"POST /v1/sign HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{").encode()  # fmt: skip
    t0 = time.monotonic()
    status, data = await _raw_http(rig.url, head)
    assert status == 408 and b"body_timeout" in data and time.monotonic() - t0 < 10
    # a client that sends garbage instead of HTTP
    status, data = await _raw_http(rig.url, b"\x00\x01\x02 garbage\r\n\r\n")
    assert status == 400
    # and the gateway still signs
    async with aiohttp.ClientSession(headers=auth) as http:
        body = {"key_id": rig.keys[0]["key_id"], "scheme": "eth_personal", "payload": "0x" + b"still here".hex()}
        async with http.post(f"{rig.url}/v1/sign", json=body) as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with http.get(f"{rig.url}/metrics") as r:
            text = await r.text()
        assert 'signer_gateway_errors_total{code="too_large"}' in text and "signer_gateway_outstanding" in text


async def test_outstanding_bound_answers_429_and_an_unanswered_call_504(rig: GatewayRig, tmp_path: Path) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    # a request topic no host reads: calls are accepted by Kafka and never answered
    orphan = f"orphan-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=rig.topo.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(orphan, 1, 1)])
    finally:
        await admin.close()
    gw = await rig.topo.start_gateway("gw-small", settings={
        "SIGNER_GATEWAY_CLIENTS": str(rig.clients_file), "SIGNER_GATEWAY_MAX_OUTSTANDING": "2",
        "SIGNER_GATEWAY_EXPIRY_GRACE_MS": "0", "SIGNER_TOPIC_REQUESTS": orphan,
        "SIGNER_GATEWAY_BODY_TIMEOUT_MS": "20000",
    })  # fmt: skip
    url = gw.address
    body = {"key_id": rig.keys[0]["key_id"], "scheme": "eth_personal", "payload": "0x01"}
    async with aiohttp.ClientSession(headers=rig.headers()) as http:
        t0 = time.monotonic()
        async with http.post(f"{url}/v1/sign", json=body, headers={"Signer-Timeout-Ms": "300"}) as r:
            out = await r.json()
            assert r.status == 504 and out["error"]["code"] == "gateway_timeout" and out["request_id"], out
            assert "may still be answered" in out["error"]["message"]
        assert time.monotonic() - t0 < 5
        # two calls in progress (held by slow bodies): the third is refused with 429 and Retry-After
        head = (f"POST /v1/sign HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()  # fmt: skip
        host, port = url.removeprefix("http://").split(":")
        held = []
        for _ in range(2):
            _reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head)
            await writer.drain()
            held.append(writer)
        try:
            for _ in range(100):  # until the gateway has admitted both (its gauge says so)
                async with http.get(f"{url}/metrics") as r:
                    if "signer_gateway_outstanding 2.0" in await r.text():
                        break
                await asyncio.sleep(0.05)
            async with http.post(f"{url}/v1/sign", json=body) as r:
                out = await r.json()
                assert r.status == 429 and r.headers["Retry-After"] == "1" and out["error"]["code"] == "overloaded"
            async with http.post(url, json={"jsonrpc": "2.0", "id": 9, "method": "eth_accounts"}) as r:
                assert r.status == 429 and (await r.json())["error"]["code"] == -32005
            async with http.get(f"{url}/upcheck") as r:
                assert r.status == 200
        finally:
            for w in held:
                w.close()
    await gw.astop()
    assert gw.returncode == 0


NODE = shutil.which("node")
NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.mark.skipif(NODE is None, reason="node is not installed: the ethers v6 client test needs Node.js 18+")
async def test_ethers_v6_uses_the_gateway_as_its_json_rpc_signer(rig: GatewayRig) -> None:
    assert (NODE_DIR / "node_modules" / "ethers").is_dir(), "run bin/setup (npm ci in tests/node) first"
    env = {**os.environ, "GATEWAY_URL": rig.url, "GATEWAY_TOKEN": TOKEN, "ADDRESS": rig.address,
           "CHAIN_ID": "11155111"}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(NODE or "node", str(NODE_DIR / "sign.mjs"), env=env, cwd=NODE_DIR,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, (out.decode(), err.decode())
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["tx_from"] == result["message_signer"] == result["typed_signer"] == rig.address
    assert Account.recover_transaction(result["raw"]) == rig.address  # and eth-account agrees


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_many_concurrent_callers_each_answered_exactly_once(rig: GatewayRig) -> None:
    """500 callers (GATEWAY_LOAD_CALLERS) for 10 s (GATEWAY_LOAD_SECONDS), closed loop: every call gets
    exactly one answer, with its own request_id and a valid signature; the gateway's memory stays bounded."""
    callers = int(os.environ.get("GATEWAY_LOAD_CALLERS", "500"))
    seconds = float(os.environ.get("GATEWAY_LOAD_SECONDS", "10"))
    key = rig.keys[0]
    pub = bytes.fromhex(key["public_key"])
    sent: list[str] = []
    answered: dict[str, int] = {}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    rss = [_rss_mib(rig.gateway.pid)]
    stop_at = time.monotonic() + seconds

    async def caller(http: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            rid = f"load-{n}-{i}"
            i += 1
            digest = hashlib.sha256(rid.encode()).digest()
            body = {
                "request_id": rid,
                "key_id": key["key_id"],
                "scheme": "secp256k1_digest",
                "payload": "0x" + digest.hex(),
            }
            sent.append(rid)
            t0 = time.perf_counter()
            async with http.post(f"{rig.url}/v1/sign", json=body) as r:
                out = await r.json()
            latencies.append(time.perf_counter() - t0)
            statuses[r.status] = statuses.get(r.status, 0) + 1
            got = out.get("request_id")
            answered[got] = answered.get(got, 0) + 1
            if r.status == 200:
                assert out["status"] == "ok", out
                import coincurve

                sig = bytes.fromhex(out["signature"][2:])
                assert coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None).format(False) == pub

    async def sample_rss() -> None:
        while time.monotonic() < stop_at:
            await asyncio.sleep(1)
            rss.append(_rss_mib(rig.gateway.pid))

    conn = aiohttp.TCPConnector(limit=callers)
    async with aiohttp.ClientSession(
        headers=rig.headers(), connector=conn, timeout=aiohttp.ClientTimeout(total=60)
    ) as http:
        await asyncio.gather(sample_rss(), *(caller(http, n) for n in range(callers)))
        async with http.get(f"{rig.url}/metrics") as r:
            metrics = await r.text()
    rss.append(_rss_mib(rig.gateway.pid))
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(f"\ngateway load: {callers} callers x {seconds:.0f}s: {len(sent)} calls ({len(sent) / seconds:.0f}/s), "
          f"HTTP {statuses}, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, gateway RSS MiB {rss[0]:.0f} -> "
          f"max {max(rss):.0f}")  # fmt: skip
    assert len(sent) == len(set(sent)) and set(answered) == set(sent), "a call without its own answer"
    assert all(v == 1 for v in answered.values()), "a call answered twice"
    assert statuses.get(200, 0) == len(sent), statuses  # under the outstanding bound: every call signed
    assert "signer_gateway_outstanding 0.0" in metrics
    assert max(rss) < 400, rss  # bounded: the pending map and bodies are bounded, nothing accumulates
