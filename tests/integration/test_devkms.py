"""The dev KMS as a real server, the KMS client, attestation and CMS - and the same client against
moto's KMS server, an independent implementation, for the plain protocol."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.local_kafka import free_port
from devkms.policy import attested_keyring_policy
from enclave_worker.attestation import DevProvider, measure_enclave_code
from enclave_worker.cms import open_enveloped_data
from enclave_worker.kms import KmsClient, KmsConfig, KmsError
from signer.topology import ChildProcess
from tests.enclaves import DEV_CREDS, start_devkms

CONFIG = b'{"v": 1}'  # the enclave configuration's bytes are part of the dev measurement


@pytest.fixture
def devkms(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    data = tmp_path / "devkms"
    proc, url = start_devkms(data, tmp_path)
    try:
        yield url, data
    finally:
        proc.stop()


def _client(url: str, secret: str | None = None) -> KmsClient:
    return KmsClient(KmsConfig(url, access_key_id=DEV_CREDS["SIGNER_KMS_ACCESS_KEY_ID"],
                               secret_access_key=secret or DEV_CREDS["SIGNER_KMS_SECRET_ACCESS_KEY"],
                               backoff_min_s=0.01))  # fmt: skip


@pytest.fixture
async def kms(devkms: tuple[str, Path]) -> AsyncIterator[KmsClient]:
    client = _client(devkms[0])
    yield client
    await client.close()


RSA_KEY = rsa.generate_private_key(65537, 2048)
SPKI = RSA_KEY.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _recipient(doc: bytes) -> dict[str, str]:
    import base64

    return {"AttestationDocument": base64.b64encode(doc).decode(), "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}


async def test_plain_encrypt_decrypt_round_trip(kms: KmsClient) -> None:
    key = await kms.create_key(description="plain")
    blob = await kms.encrypt(key, b"hello", {"purpose": "test"})
    assert await kms.decrypt(blob, {"purpose": "test"}) == (b"hello", None, key)
    with pytest.raises(KmsError) as info:
        await kms.decrypt(blob, {"purpose": "other"})
    assert info.value.code == "InvalidCiphertextException"


async def test_attested_enclave_gets_the_data_key_only_as_cms_to_its_key(
    kms: KmsClient, devkms: tuple[str, Path]
) -> None:
    provider = DevProvider(devkms[1] / "pki", CONFIG)
    key = await kms.create_key(attested_keyring_policy(measure_enclave_code(CONFIG).hex()))
    recipient = _recipient(provider.document(SPKI))
    dk = await kms.generate_data_key(key, {"signer:keyring": "kr1"}, recipient)
    assert dk.plaintext is None and dk.ciphertext_for_recipient is not None
    dek = open_enveloped_data(dk.ciphertext_for_recipient, RSA_KEY)
    assert len(dek) == 32
    plain, cms, _ = await kms.decrypt(dk.ciphertext_blob, {"signer:keyring": "kr1"}, recipient)
    assert plain is None and cms is not None and open_enveloped_data(cms, RSA_KEY) == dek
    # without an attestation there is no plaintext at all
    with pytest.raises(KmsError) as info:
        await kms.decrypt(dk.ciphertext_blob, {"signer:keyring": "kr1"})
    assert info.value.code == "AccessDeniedException"


async def test_a_different_image_is_refused(kms: KmsClient, devkms: tuple[str, Path]) -> None:
    provider = DevProvider(devkms[1] / "pki", CONFIG)
    key = await kms.create_key(attested_keyring_policy(measure_enclave_code(CONFIG).hex()))
    provider.pcrs[0] = bytes(48)  # a debug-mode enclave reports zeros; any other image differs too
    with pytest.raises(KmsError) as info:
        await kms.generate_data_key(key, {}, _recipient(provider.document(SPKI)))
    assert info.value.code == "AccessDeniedException"


async def test_forged_or_stale_documents_are_invalid(kms: KmsClient, devkms: tuple[str, Path]) -> None:
    key = await kms.create_key()
    provider = DevProvider(devkms[1] / "pki", CONFIG)
    good = provider.document(SPKI)
    provider._key = ec.generate_private_key(ec.SECP384R1())  # a key the dev CA never certified
    forged = provider.document(SPKI)
    for doc, why in ((forged, "does not verify"), (good[:-3] + b"xyz", "does not verify"), (b"\xa0", "COSE")):
        with pytest.raises(KmsError) as info:
            await kms.generate_data_key(key, {}, _recipient(doc))
        assert info.value.code == "ValidationException" and why in info.value.message


async def test_bad_signatures_are_refused(devkms: tuple[str, Path]) -> None:
    client = _client(devkms[0], secret="wrong")
    try:
        with pytest.raises(KmsError) as info:
            await client.create_key()
        assert info.value.code == "InvalidSignatureException"
    finally:
        await client.close()
    async with aiohttp.ClientSession() as s:
        async with s.post(devkms[0], data=b"{}", headers={"X-Amz-Target": "TrentService.CreateKey"}) as r:
            assert (
                r.status == 400 and (await r.json(content_type=None))["__type"] == "MissingAuthenticationTokenException"
            )


async def test_throttling_is_retried_until_it_clears(kms: KmsClient, devkms: tuple[str, Path]) -> None:
    key = await kms.create_key()
    async with aiohttp.ClientSession() as s:
        await s.post(f"{devkms[0]}/_dev/throttle", json={"next": 3})
    blob = await kms.encrypt(key, b"x")
    assert kms.throttles == 3 and (await kms.decrypt(blob))[:2] == (b"x", None)
    async with aiohttp.ClientSession() as s:
        await s.post(f"{devkms[0]}/_dev/throttle", json={"next": 1000})
    with pytest.raises(KmsError) as info:
        await kms.call("Encrypt", {"KeyId": key, "Plaintext": "eA=="}, deadline=time.monotonic() + 0.3)
    assert info.value.code == "ThrottlingException"


async def test_key_material_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "devkms"
    proc, url = start_devkms(data, tmp_path)
    client = _client(url)
    try:
        key = await client.create_key()
        blob = await client.encrypt(key, b"persist me")
    finally:
        await client.close()
        proc.stop()
    proc, url = start_devkms(data, tmp_path)
    client = _client(url)
    try:
        assert (await client.decrypt(blob))[:2] == (b"persist me", None)
    finally:
        await client.close()
        proc.stop()


@pytest.fixture
def moto_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = ChildProcess("moto.server", ["-H", "127.0.0.1", "-p", str(port)], log=tmp_path / "moto.log").spawn()
    try:
        deadline = time.monotonic() + 60
        while True:  # readiness: the HTTP port answers
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if not proc.running or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not start: {(tmp_path / 'moto.log').read_text()[-500:]}"
                    ) from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


async def test_the_client_speaks_the_real_protocol_to_moto(moto_server: str) -> None:
    client = KmsClient(KmsConfig(moto_server, access_key_id="testing", secret_access_key="testing"))
    try:
        key = await client.create_key(description="moto")
        blob = await client.encrypt(key, b"independent", {"a": "b"})
        assert (await client.decrypt(blob, {"a": "b"}))[:2] == (b"independent", None)
        dk = await client.generate_data_key(key, {"k": "v"})
        assert dk.plaintext is not None and len(dk.plaintext) == 32
        assert (await client.decrypt(dk.ciphertext_blob, {"k": "v"}))[0] == dk.plaintext
    finally:
        await client.close()
