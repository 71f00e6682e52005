"""Running the HTTP gateway: mutual TLS (client certificates mapped to identities, the gateway signing
`auth` for an identity a key policy names), a SIGTERM with calls in flight (drained, then exit 0), and
its Grafana dashboard against a real Prometheus scraping a gateway under load. Real parts: Kafka, the
dev KMS, an enclave worker process, a host process, `python -m signer gateway` processes."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import os
import signal
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import coincurve
import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.topics import TopicLayout
from signer.topology import Topology
from tests.conftest import topology

TOKEN = "ops-" + uuid.uuid4().hex


@pytest.fixture
async def cluster(bootstrap: str, layout: TopicLayout, sock_dir: Path, tmp_path: Path) -> AsyncIterator[Topology]:
    """Kafka (the session's), the dev KMS, one enclave and one host; gateways are started by each test."""
    topo = topology(tmp_path, sock_dir, bootstrap, layout)
    try:
        await topo.start_kms()
        await topo.provision()
        await topo.start_enclave("enclave-ops")
        await topo.start_host()
        yield topo
    finally:
        await topo.aclose()


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _digest_body(key_id: str, rid: str | None = None) -> tuple[dict[str, Any], bytes]:
    digest = os.urandom(32)
    body = {"key_id": key_id, "scheme": "secp256k1_digest", "payload": "0x" + digest.hex()}
    if rid is not None:
        body["request_id"] = rid
    return body, digest


def _signed_by(result: dict[str, Any], digest: bytes, public_key_hex: str) -> bool:
    sig = bytes.fromhex(result["signature"][2:])
    recovered = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
    return recovered.format(False) == bytes.fromhex(public_key_hex)


# -- mutual TLS -----------------------------------------------------------------------------------


class Pki:
    """A CA and the certificates it issues, written as PEM files in `directory`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        self.ca_file = self._write(f"{name}-ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def _write(self, filename: str, data: bytes) -> Path:
        path = self.dir / filename
        path.write_bytes(data)
        return path

    def issue(self, common_name: str, *, server: bool) -> tuple[Path, Path]:
        """(certificate file, key file) for a server on 127.0.0.1 or a client named `common_name`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )  # fmt: skip
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        stem = f"{self.name}-{common_name}"
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self._write(f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM)), self._write(
            f"{stem}.key", key_pem
        )

    def client_context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client that trusts this CA's server certificate, presenting `cert` if given."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx


async def _sign_over(
    url: str, ctx: ssl.SSLContext, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.post(f"{url}/v1/sign", json=body, headers=headers) as r:
            return r.status, await r.json()


async def _kafka_round_trip(bootstrap: str, layout: TopicLayout, request: dict[str, Any]) -> dict[str, Any]:
    """Produce one SignRequest straight to the request topic and read its SignResult."""
    consumer = AIOKafkaConsumer(layout.results, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                isolation_level="read_committed")  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    try:
        await producer.send_and_wait(layout.requests, msgpack.packb(request), key=request["key_id"].encode())
        async with asyncio.timeout(60):
            while True:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in records:
                        result: dict[str, Any] = msgpack.unpackb(rec.value)
                        if result.get("request_id") == request["request_id"]:
                            return result
    finally:
        await producer.stop()
        await consumer.stop()


async def test_mtls_client_certificates_map_to_identities_and_the_gateway_vouches_with_auth(
    cluster: Topology, bootstrap: str, layout: TopicLayout, tmp_path: Path
) -> None:
    pki, rogue = Pki(tmp_path, "good"), Pki(tmp_path, "rogue")
    server = pki.issue("gateway", server=True)
    treasury_cert, payments_cert = pki.issue("treasury.internal", server=False), pki.issue("payments", server=False)
    rogue_cert = rogue.issue("treasury.internal", server=False)  # the right name, from another CA
    # the gateway's auth key for the identity "treasury": the key policy below names it
    auth_key = Ed25519PrivateKey.generate()
    auth_pem = tmp_path / "treasury-auth.pem"
    auth_pem.write_bytes(auth_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))  # fmt: skip
    auth_pub = auth_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    operator = cluster.operator()
    open_key = await operator.create_key("secp256k1", "default")
    guarded = await operator.create_key("secp256k1", "default", policy={
        "require_auth": True, "clients": {"treasury": {"scheme": "ed25519", "public_key": auth_pub.hex()}}})  # fmt: skip
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({
        "treasury": {"tls_cn": "treasury.internal", "keys": [guarded["key_id"], open_key["key_id"]],
                     "auth_key": str(auth_pem)},
        "payments": {"tls_cn": "payments", "keys": [open_key["address"]]},
        "alice": {"token_sha256": _sha(TOKEN)},
    }))  # fmt: skip
    gw = await cluster.start_gateway(settings={
        "SIGNER_GATEWAY_CLIENTS": str(clients), "SIGNER_GATEWAY_TLS_CERT": str(server[0]),
        "SIGNER_GATEWAY_TLS_KEY": str(server[1]), "SIGNER_GATEWAY_TLS_CLIENT_CA": str(pki.ca_file)})  # fmt: skip
    url = gw.address
    assert url.startswith("https://127.0.0.1:")

    # a certificate from the CA is its identity: its key scope applies, and it signs
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.client_context(payments_cert))) as http:
        async with http.get(f"{url}/v1/keys") as r:
            assert r.status == 200
            assert [k["key_id"] for k in (await r.json())["keys"]] == [open_key["key_id"]]
    body, digest = _digest_body(open_key["key_id"])
    status, res = await _sign_over(url, pki.client_context(payments_cert), body)
    assert status == 200 and res["status"] == "ok", res
    assert _signed_by(res, digest, open_key["public_key"])
    status, res = await _sign_over(url, pki.client_context(payments_cert), _digest_body(guarded["key_id"])[0])
    assert status == 403 and res["error"]["code"] == "forbidden"

    # no certificate and no token: 401; a token still works over TLS
    status, res = await _sign_over(url, pki.client_context(), body)
    assert status == 401 and res["error"]["code"] == "unauthorized"
    status, res = await _sign_over(url, pki.client_context(), _digest_body(open_key["key_id"])[0],
                                   {"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert status == 200 and res["status"] == "ok"

    # a certificate from another CA is refused in the TLS handshake: no HTTP answer at all
    # (TLS 1.3: the server's alert arrives after the client's Finished, as a reset or a closed connection)
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await _sign_over(url, pki.client_context(rogue_cert), body)
    tls12 = pki.client_context(rogue_cert)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.2: the handshake itself fails (open_connection waits for it)
    host, port = url.removeprefix("https://").split(":")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection(host, int(port), ssl=tls12)

    # the key requiring auth: signed through the gateway, which signs `auth` as "treasury" ...
    body, digest = _digest_body(guarded["key_id"], rid=f"guarded-{uuid.uuid4().hex[:8]}")
    status, res = await _sign_over(url, pki.client_context(treasury_cert), body)
    assert status == 200 and res["status"] == "ok", res
    assert _signed_by(res, digest, guarded["public_key"])
    # ... while a caller the gateway holds no auth key for is refused by the enclave's policy
    status, res = await _sign_over(url, pki.client_context(), _digest_body(guarded["key_id"])[0],
                                   {"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert status == 200 and res["status"] == "rejected" and res["error"]["code"] == "auth_required", res
    # ... and the same request produced straight to Kafka, without auth, is refused
    direct = {"v": 1, "request_id": f"direct-{uuid.uuid4().hex[:8]}", "key_id": guarded["key_id"],
              "scheme": "secp256k1_digest", "payload": digest}  # fmt: skip
    result = await _kafka_round_trip(bootstrap, layout, direct)
    assert result["status"] == "rejected" and result["error"]["code"] == "auth_required", result
    assert "signature" not in result
    assert await gw.astop() == 0


# -- SIGTERM: drain, then exit 0 -------------------------------------------------------------------


async def _outstanding(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("signer_gateway_outstanding "):
                return float(line.split()[1])
    return -1.0


async def _until(check: Any, timeout: float = 30.0) -> None:
    """Poll an async condition (a readiness signal the gateway exposes) until it holds."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state is in another process
            await asyncio.sleep(0.05)


async def test_sigterm_refuses_new_calls_answers_those_in_flight_and_exits_0(cluster: Topology, tmp_path: Path) -> None:
    key = await cluster.operator().create_key("secp256k1", "default")
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"alice": {"token_sha256": _sha(TOKEN)}}))
    host = cluster.hosts["host"].process
    headers = {"Authorization": f"Bearer {TOKEN}"}
    in_flight = 16

    async def sigterm_with_calls_in_flight(drain_s: str) -> tuple[list[tuple[int, dict[str, Any], bytes]], float]:
        """Calls held in flight (the host is paused), SIGTERM to the gateway, a new call refused; the host
        resumes after `resume_after` seconds. The in-flight calls' answers and the gateway's exit time."""
        gw = await cluster.start_gateway(f"gw-drain-{drain_s}", settings={
            "SIGNER_GATEWAY_CLIENTS": str(clients), "SIGNER_GATEWAY_DRAIN_S": drain_s,
            "SIGNER_GATEWAY_ID": f"drain{drain_s}-{uuid.uuid4().hex[:6]}"})  # fmt: skip
        url = gw.address
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=100)) as http:

            async def call() -> tuple[int, dict[str, Any], bytes]:
                body, digest = _digest_body(key["key_id"])
                async with http.post(f"{url}/v1/sign", json=body) as r:
                    return r.status, await r.json(), digest

            host.send_signal(signal.SIGSTOP)  # results wait: the calls stay in flight
            try:
                calls = [asyncio.create_task(call()) for _ in range(in_flight)]
                await _until(lambda: _aeq(_outstanding(http, url), in_flight))
                gw.send_signal(signal.SIGTERM)
                t_term = time.monotonic()

                async def stopping() -> bool:  # the gateway's own readiness signal: /healthcheck DOWN
                    async with http.get(f"{url}/healthcheck") as r:
                        return r.status == 503

                await _until(stopping)
                # a new call is refused (503, retry later), never queued behind the drain
                body, _ = _digest_body(key["key_id"])
                async with http.post(f"{url}/v1/sign", json=body) as r:
                    assert r.status == 503 and r.headers["Retry-After"] == "1"
                    assert (await r.json())["error"]["code"] == "unavailable"
                assert not any(c.done() for c in calls), "an in-flight call was answered before the host resumed"
                if drain_s != "1":
                    await asyncio.sleep(0.5)  # the drain waits for them, not for a timer
                    assert gw.running
            finally:
                host.send_signal(signal.SIGCONT)
            answers = await asyncio.gather(*calls)
        code = await asyncio.to_thread(gw.wait, 60)
        assert code == 0, gw.log_tail()
        return answers, time.monotonic() - t_term

    # drain time enough: every call accepted before SIGTERM is answered with its signature
    answers, _ = await sigterm_with_calls_in_flight("30")
    assert len(answers) == in_flight
    for status, res, digest in answers:
        assert status == 200 and res["status"] == "ok", res
        assert _signed_by(res, digest, key["public_key"])

    # a drain timeout shorter than the wait: the calls still in flight are answered 503, none is left hanging
    host.send_signal(signal.SIGSTOP)
    try:
        gw = await cluster.start_gateway("gw-short", settings={
            "SIGNER_GATEWAY_CLIENTS": str(clients), "SIGNER_GATEWAY_DRAIN_S": "1",
            "SIGNER_GATEWAY_ID": f"short-{uuid.uuid4().hex[:6]}"})  # fmt: skip
        url = gw.address
        async with aiohttp.ClientSession(headers=headers) as http:

            async def call() -> tuple[int, dict[str, Any]]:
                async with http.post(f"{url}/v1/sign", json=_digest_body(key["key_id"])[0]) as r:
                    return r.status, await r.json()

            calls = [asyncio.create_task(call()) for _ in range(4)]
            await _until(lambda: _aeq(_outstanding(http, url), 4))
            gw.send_signal(signal.SIGTERM)
            t_term = time.monotonic()
            answers_short = await asyncio.gather(*calls)
        assert await asyncio.to_thread(gw.wait, 60) == 0
        assert time.monotonic() - t_term < 10
    finally:
        host.send_signal(signal.SIGCONT)
    for status, res in answers_short:
        assert status == 503 and res["error"]["code"] == "unavailable", res
        assert "retry with the same request_id" in res["error"]["message"]


async def _aeq(value: Any, expected: float) -> bool:
    return bool(await value == expected)
