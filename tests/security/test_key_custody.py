"""The host can never learn, choose or re-policy a key.

Each test is an attack a compromised host can mount with real enclave worker and dev KMS
processes (tests/security/hostile.py), and shows the attacker gets nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from eth_account import Account

from devkms.pki import load_dev_pki
from enclave_worker.attestation import DevProvider
from enclave_worker.kms import KmsError
from enclave_worker.trust import ConfigError, parse_config
from schemas.operations import import_label, packb
from signer.operator import AdminSession, OperatorKey, ReceiptError, verify_enclave
from tests.rig import digest_req, recovered
from tests.security.hostile import Stage

SECRET = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
POLICY = {"schemes": ["eth_tx"], "to_allowlist": ["0x" + "11" * 20], "max_value": 1000}


def _op(stage: Stage) -> AdminSession:
    assert stage.operator is not None
    return stage.operator


def _signed(stage: Stage, op: str, identity: bytes, args: dict[str, Any], **over: Any) -> dict[str, Any]:
    """An operation the legitimate operator signed (the attacker may replay, reroute or alter it)."""
    assert stage.dev is not None
    body = {"op": op, "enclave": identity, "nonce": secrets.token_bytes(16),
            "expires_ms": int((time.time() + 120) * 1000), "args": args, **over}  # fmt: skip
    raw = packb(body)
    return {"operation": raw, "approvals": [OperatorKey.load(stage.dev.operator_key_path).approve(raw)]}


# -- 1. the host chooses the KMS key behind a data key ------------------------------------------------


async def test_the_host_cannot_put_a_keyring_under_its_own_kms_key(stage: Stage) -> None:
    kms = stage.attacker_kms()
    try:
        evil_arn = await kms.create_key(description="the host's own key: kms:* for everyone")
        key = await _op(stage).create_key("secp256k1", "kr", POLICY)
        ch = await stage.channel()
        # the old, unauthenticated key operations that named a KMS key are refused outright
        for op, args in (("keys.rotate_dek", {"keyring": "kr", "kms_key_id": evil_arn}),
                         ("keys.create", {"keyring": "fresh", "scheme": "secp256k1", "kms_key_id": evil_arn})):  # fmt: skip
            reply = await ch.key_op(op, args)
            assert (reply["ok"], reply["error"]["code"]) == (False, "operation_unsigned"), reply
        # an envelope under the host's key (whose data key the host knows) is never loaded
        dk = await kms.generate_data_key(evil_arn, {"signer:keyring": "evil", "signer:dek_version": "1"})
        evil_env = {"v": 1, "keyring_id": "evil", "kms_key_id": evil_arn, "dek_version": 1,
                    "encrypted_dek": dk.ciphertext_blob, "created_ms": 1}  # fmt: skip
        reply = await ch.key_op("keyrings.load", {"envelopes": [evil_env], "keys": []})
        assert reply["error"]["code"] == "kms_key_not_allowed", reply
        rotated = await _op(stage).rotate_dek("kr")
        assert rotated["kms_key_arn"] == stage.dev.kms_key_arn  # type: ignore[union-attr]
        # every keyring the enclaves made is under the configured key, which releases data keys only
        # to the attested image: the host's own credentials get nothing
        for env_file in (stage.tmp / "keystore").rglob("envelope.*"):
            env = msgpack.unpackb(env_file.read_bytes())
            assert env["kms_key_id"] == stage.dev.kms_key_arn  # type: ignore[union-attr]
            with pytest.raises(KmsError) as info:
                await kms.decrypt(env["encrypted_dek"], {"signer:keyring": env["keyring_id"],
                                                         "signer:dek_version": str(env["dek_version"])})  # fmt: skip
            assert info.value.code == "AccessDeniedException"
        res = (await _sign(stage, [digest_req("d", key["key_id"])]))[0]
        assert res["error"]["code"] == "policy_scheme"  # the key still carries its policy
        await ch.close()
    finally:
        await kms.close()


async def test_a_disguised_envelope_does_not_unwrap(stage: Stage, tmp_path: Path) -> None:
    """An envelope naming the configured key ARN with a ciphertext under the host's key: KMS says so
    (IncorrectKeyException), so no data key the host knows ever reaches a wallet key."""
    kms = stage.attacker_kms()
    try:
        evil_arn = await kms.create_key(description="host")
        dk = await kms.generate_data_key(evil_arn, {"signer:keyring": "evil", "signer:dek_version": "1"})
        ch = await stage.channel()
        env = {"v": 1, "keyring_id": "evil", "kms_key_id": stage.dev.kms_key_arn, "dek_version": 1,  # type: ignore[union-attr]
               "encrypted_dek": dk.ciphertext_blob, "created_ms": 1}  # fmt: skip
        assert (await ch.key_op("keyrings.load", {"envelopes": [env], "keys": []}))["ok"]
        identity = verify_enclave((await ch.key_op("enclave.identity", {}))["result"]["attestation_document"],
                                  load_dev_pki(stage.tmp / "devkms" / "pki").root, stage.dev.pcr0, "enc0")  # type: ignore[union-attr]  # fmt: skip
        reply = await ch.key_op("keys.create", _signed(stage, "keys.create", identity.identity_raw,
                                                        {"keyring": "evil", "scheme": "secp256k1", "policy": None}))  # fmt: skip
        assert reply["ok"] is False and reply["error"]["code"] == "kms_error", reply
        assert "IncorrectKey" in reply["error"]["message"]
        await ch.close()
    finally:
        await kms.close()


async def test_a_kms_answer_for_another_key_is_refused(tmp_path: Path) -> None:
    """KeyId is checked in every KMS answer (the KMS client is the seam; a unit test)."""
    from enclave_worker.kms import DataKey
    from enclave_worker.vault import Vault
    from schemas.refusals import Refused

    arn = "arn:aws:kms:us-east-1:000000000000:key/good"
    op = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    config = parse_config(json.dumps({"v": 1, "attestation": "dev", "kms": {"endpoint": "http://kms", "region":
                                      "us-east-1", "key_arns": [arn]}, "operators": {"o": op}}).encode())  # fmt: skip

    class LyingKms:
        calls = throttles = 0

        async def generate_data_key(self, *a: Any, **k: Any) -> DataKey:
            return DataKey(b"blob", None, b"cms", "arn:aws:kms:us-east-1:999999999999:key/evil")

        async def close(self) -> None:
            pass

    class Doc:
        def document(
            self, public_key: bytes | None, user_data: bytes | None = None, nonce: bytes | None = None
        ) -> bytes:
            return b"doc"

    vault = Vault(LyingKms(), Doc(), config)  # type: ignore[arg-type]
    with pytest.raises(Refused) as info:
        await vault.create_key("kr", "secp256k1")
    assert info.value.code == "kms_protocol" and "not the one asked for" in info.value.message
    assert vault.current == {}  # nothing was loaded from the lying answer


# -- 2. admin operations are operator-signed; replies are enclave-signed ----------------------------------


async def test_a_host_cannot_strip_or_change_a_signed_policy(stage: Stage) -> None:
    op = _op(stage)
    enclave = await op.enclave("kr")
    good = _signed(stage, "keys.create", enclave.identity_raw, {"keyring": "kr", "scheme": "secp256k1",
                                                                    "policy": POLICY})  # fmt: skip
    body = msgpack.unpackb(good["operation"])
    body["args"]["policy"] = None  # the host drops the policy from the signed bytes
    stripped = {"operation": packb(body), "approvals": good["approvals"]}
    ch = await stage.channel(0 if enclave.enclave_id == "enc0" else 1)
    reply = await ch.key_op("keys.create", stripped)
    assert (reply["ok"], reply["error"]["code"]) == (False, "operation_bad_signature")
    # an approval by a key the configuration does not name does not count
    attacker = OperatorKey("mallory", Ed25519PrivateKey.generate())
    reply = await ch.key_op("keys.create", {"operation": packb(body), "approvals": [attacker.approve(packb(body))]})
    assert reply["error"]["code"] == "operation_quorum"
    reply = await ch.key_op("keys.create", {"keyring": "kr", "scheme": "secp256k1"})  # unsigned, as before
    assert reply["error"]["code"] == "operation_unsigned"
    # the genuine operation works once, and only once, and only on the enclave it names
    assert (await ch.key_op("keys.create", good))["ok"]
    assert (await ch.key_op("keys.create", good))["error"]["code"] == "operation_replayed"
    other = await stage.channel(1 if enclave.enclave_id == "enc0" else 0)
    assert (await other.key_op("keys.create", good))["error"]["code"] == "operation_wrong_enclave"
    expired = _signed(stage, "keys.create", enclave.identity_raw, {"keyring": "kr", "scheme": "secp256k1",
                      "policy": None}, expires_ms=int(time.time() * 1000) - 1)  # fmt: skip
    assert (await ch.key_op("keys.create", expired))["error"]["code"] == "operation_expired"
    forever = _signed(stage, "keys.create", enclave.identity_raw, {"keyring": "kr", "scheme": "secp256k1",
                      "policy": None}, expires_ms=int(time.time() * 1000) + 10**9)  # fmt: skip
    assert (await ch.key_op("keys.create", forever))["error"]["code"] == "operation_too_long"
    # a signed create replayed as another operation is refused
    assert (await ch.key_op("keys.rotate_dek", good))["error"]["code"] == "operation_mismatch"
    await ch.close()
    await other.close()


async def test_an_import_cannot_be_replayed_without_its_policy(stage: Stage) -> None:
    op = _op(stage)
    enclave = await op.enclave("imp")
    label = import_label("imp", "secp256k1", POLICY)
    encrypted = enclave.import_key.encrypt(SECRET, OAEP(MGF1(hashes.SHA256()), hashes.SHA256(), label))
    digest = hashlib.sha256(encrypted).digest()
    good = _signed(stage, "keys.import", enclave.identity_raw, {"keyring": "imp", "scheme": "secp256k1",
                   "policy": POLICY, "encrypted_key_sha256": digest})  # fmt: skip
    ch = await stage.channel(0 if enclave.enclave_id == "enc0" else 1)
    first = await ch.key_op("keys.import", {**good, "encrypted_key": encrypted})
    assert first["ok"], first
    assert first["result"]["key"]["address"] == Account.from_key(SECRET).address
    assert first["result"]["key"]["policy"] == POLICY
    # the same ciphertext again: the signed operation is spent ...
    again = await ch.key_op("keys.import", {**good, "encrypted_key": encrypted})
    assert again["error"]["code"] == "operation_replayed"
    # ... and even an operator tricked into approving it without the policy gets nothing: the
    # ciphertext is bound to its policy by the OAEP label
    tricked = _signed(stage, "keys.import", enclave.identity_raw, {"keyring": "imp", "scheme": "secp256k1",
                      "policy": None, "encrypted_key_sha256": digest})  # fmt: skip
    reply = await ch.key_op("keys.import", {**tricked, "encrypted_key": encrypted})
    assert reply["error"]["code"] == "import_undecryptable", reply
    # a ciphertext swapped under a signed operation is refused before decryption
    other = enclave.import_key.encrypt(b"\x01" * 32, OAEP(MGF1(hashes.SHA256()), hashes.SHA256(), label))
    fresh = _signed(stage, "keys.import", enclave.identity_raw, {"keyring": "imp", "scheme": "secp256k1",
                    "policy": POLICY, "encrypted_key_sha256": digest})  # fmt: skip
    assert (await ch.key_op("keys.import", {**fresh, "encrypted_key": other}))["error"]["code"] == "operation_mismatch"
    await ch.close()


class TamperingRelay:
    """The host between the operator's CLI and the cluster, rewriting replies."""

    def __init__(self, stage: Stage, tamper: Any) -> None:
        self.stage, self.tamper = stage, tamper
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        assert self.stage.backend is not None
        reply = await self.stage.backend.handle(op, args)
        self.seen.append((op, reply))
        return dict(self.tamper(op, reply))


def _session(stage: Stage, relay: Any) -> AdminSession:
    assert stage.dev is not None
    return AdminSession(relay, [OperatorKey.load(stage.dev.operator_key_path)],
                        load_dev_pki(stage.tmp / "devkms" / "pki").root, stage.dev.pcr0)  # fmt: skip


async def test_a_fabricated_or_altered_receipt_is_refused(stage: Stage) -> None:
    fake_identity = Ed25519PrivateKey.generate()

    def fabricate(op: str, reply: dict[str, Any]) -> dict[str, Any]:
        if op != "keys.create":
            return reply
        body = reply["receipt"]["body"]
        return {**reply, "receipt": {"body": body, "sig": fake_identity.sign(b"signer-admin-receipt/v1\x00" + body)}}

    with pytest.raises(ReceiptError, match="not signed by the attested enclave"):
        await _session(stage, TamperingRelay(stage, fabricate)).create_key("secp256k1", "kr", POLICY)

    def no_receipt(op: str, reply: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in reply.items() if k != "receipt"} if op == "keys.create" else reply

    with pytest.raises(ReceiptError, match="no enclave receipt"):
        await _session(stage, TamperingRelay(stage, no_receipt)).create_key("secp256k1", "kr", POLICY)

    earlier: dict[str, Any] = {}

    def replay_old(op: str, reply: dict[str, Any]) -> dict[str, Any]:
        if op == "keys.create":
            if "receipt" not in earlier:
                earlier["receipt"] = reply["receipt"]
                return reply
            return {**reply, "receipt": earlier["receipt"]}
        return reply

    session = _session(stage, TamperingRelay(stage, replay_old))
    await session.create_key("secp256k1", "kr", POLICY)
    with pytest.raises(ReceiptError):  # the old receipt: another operation, or another enclave
        await session.create_key("secp256k1", "kr", POLICY)


async def test_the_cli_refuses_a_fabricated_created_key(stage: Stage, tmp_path: Path) -> None:
    """End to end through the CLI's code path: a host that answers "created" without an enclave."""
    attacker_doc_key = Ed25519PrivateKey.generate()

    async def liar(op: str, args: dict[str, Any]) -> dict[str, Any]:
        assert stage.backend is not None
        if op == "enclave.identity":
            return await stage.backend.handle(op, args)
        body = packb([["op", op], ["operation", b"x" * 32], ["result", []]])
        return {"key_id": "k_fake", "receipt": {"body": body, "sig": attacker_doc_key.sign(body)}}

    with pytest.raises(ReceiptError):
        await _session(stage, liar).create_key("secp256k1", "kr")


# -- 3. imports are encrypted only to an expected, non-debug image -----------------------------------------


def test_import_refuses_a_debug_or_unexpected_image(tmp_path: Path, stage: Stage) -> None:
    assert stage.dev is not None
    pki_dir = stage.tmp / "devkms" / "pki"
    root = load_dev_pki(pki_dir).root
    attacker_rsa = rsa.generate_private_key(65537, 2048)
    spki = attacker_rsa.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    provider = DevProvider(pki_dir, stage.dev.config_path.read_bytes())
    from schemas.operations import identity_user_data

    user_data = identity_user_data(b"\x01" * 32, b"\x02" * 32)
    provider.pcrs[0] = bytes(48)  # a debug-mode enclave (or one built by the host)
    debug_doc = provider.document(spki, user_data)
    with pytest.raises(ReceiptError, match="debug mode"):
        verify_enclave(debug_doc, root, "00" * 48, "e")  # even if told to expect zeros
    with pytest.raises(ReceiptError, match="debug mode"):
        verify_enclave(debug_doc, root, stage.dev.pcr0, "e")
    provider.pcrs[0] = hashlib.sha384(b"an image the host built").digest()
    with pytest.raises(ReceiptError, match="not the expected"):
        verify_enclave(provider.document(spki, user_data), root, stage.dev.pcr0, "e")
    with pytest.raises(ReceiptError, match="expected PCR0"):
        verify_enclave(provider.document(spki, user_data), root, "", "e")
    with pytest.raises(ValueError, match="PCR0"):
        AdminSession(lambda op, a: None, [OperatorKey.load(stage.dev.operator_key_path)], root, "")  # type: ignore[arg-type, return-value]


# -- 4. KMS answers cannot be passed off as imports ------------------------------------------------------------


async def test_a_kms_answer_relayed_as_an_import_is_refused(stage: Stage) -> None:
    """The host asks KMS to decrypt a keyring's data key to the enclave's own attested document, and
    relays KMS's encrypted content key as a key import. Imports use another RSA key and an OAEP
    label, and need an operator's signature: nothing is sealed, nothing learned."""
    await _op(stage).create_key("secp256k1", "kr")
    enclave = await _op(stage).enclave("kr")
    ch = await stage.channel(0 if enclave.enclave_id == "enc0" else 1)
    doc = (await ch.key_op("enclave.identity", {}))["result"]["attestation_document"]
    env = msgpack.unpackb(next((stage.tmp / "keystore").rglob("envelope.v1.msgpack")).read_bytes())
    kms = stage.attacker_kms()
    try:
        recipient = {"AttestationDocument": base64.b64encode(doc).decode(), "KeyEncryptionAlgorithm":
                     "RSAES_OAEP_SHA_256"}  # fmt: skip
        _, cms, _ = await kms.decrypt(env["encrypted_dek"], {"signer:keyring": "kr", "signer:dek_version": "1"},
                                      recipient)  # fmt: skip
    finally:
        await kms.close()
    assert cms is not None
    from asn1crypto import cms as asn1cms

    ktri = asn1cms.ContentInfo.load(cms)["content"]["recipient_infos"][0].chosen
    encrypted_cek = ktri["encrypted_key"].native
    reply = await ch.key_op("keys.import", {"keyring": "kr", "scheme": "secp256k1", "encrypted_key": encrypted_cek})
    assert reply["error"]["code"] == "operation_unsigned"
    # an operator tricked into approving exactly that ciphertext: the label does not match KMS's (none)
    tricked = _signed(stage, "keys.import", enclave.identity_raw, {"keyring": "kr", "scheme": "secp256k1",
                      "policy": None, "encrypted_key_sha256": hashlib.sha256(encrypted_cek).digest()})  # fmt: skip
    reply = await ch.key_op("keys.import", {**tricked, "encrypted_key": encrypted_cek})
    assert reply["error"]["code"] == "import_undecryptable", reply
    await ch.close()


# -- 5. trust anchors, typed replies, atomic rotation ----------------------------------------------------------


def test_the_configuration_requires_tls_to_kms_outside_dev() -> None:
    op = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    arn = "arn:aws:kms:us-east-1:111122223333:key/abc"
    cfg = {"v": 1, "attestation": "nsm", "kms": {"endpoint": "http://kms.local", "region": "us-east-1",
           "key_arns": [arn]}, "operators": {"alice": op}}  # fmt: skip
    with pytest.raises(ConfigError, match="https"):
        parse_config(json.dumps(cfg).encode())
    cfg["kms"]["endpoint"] = "https://kms.us-east-1.amazonaws.com"  # type: ignore[index]
    assert parse_config(json.dumps(cfg).encode()).kms_endpoint.startswith("https://")
    for bad in ({"key_arns": ["*"]}, {"key_arns": []}):
        with pytest.raises(ConfigError):
            parse_config(json.dumps({**cfg, "kms": {**cfg["kms"], **bad}}).encode())  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="quorum"):
        parse_config(json.dumps({**cfg, "quorum": 2}).encode())


async def test_an_enclave_with_a_loosened_configuration_is_refused_its_keys(stage: Stage) -> None:
    """The host starts an enclave whose configuration adds its own operator: the configuration is
    part of the measurement, so KMS no longer releases the data keys to it."""
    assert stage.dev is not None
    key = await _op(stage).create_key("secp256k1", "kr")
    config = json.loads(stage.dev.config_path.read_text())
    config["operators"]["mallory"] = Ed25519PrivateKey.generate().public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw).hex()  # fmt: skip
    loosened = stage.tmp / "loosened.json"
    loosened.write_text(json.dumps(config))
    url = await stage.start_enclave("loose", env={"ENCLAVE_CONFIG": str(loosened)})
    from signer.backend import EnclaveBackend
    from signer.pool import PoolSettings

    assert stage.backend is not None  # the host's key store, loaded into the loosened enclave on connect
    backend = EnclaveBackend([url], stage.backend.store, PoolSettings(connections_per_enclave=1))
    await backend.start(ready_timeout=20)
    try:
        res = await backend.sign_many([(key["key_id"], msgpack.packb(digest_req("x", key["key_id"])))])
        assert (res[0]["status"], res[0]["error"]["code"]) == ("error", "kms_access_denied"), res
    finally:
        await backend.close()


async def test_every_key_operation_gets_a_typed_reply(stage: Stage) -> None:
    ch = await stage.channel()
    hostile = [
        ("keys.rotate_dek", {"operation": b"\xc1", "approvals": [{"operator": "x", "sig": b"s"}]}),
        ("keys.create", {"operation": 7, "approvals": "no"}),
        ("keyrings.load", {"envelopes": [{"keyring_id": "k", "encrypted_dek": 10**9}], "keys": []}),
        ("keyrings.load", {"envelopes": [], "keys": [{"key_id": ["x"]}]}),
        ("keys.list", {"nonce": 5}),
        ("kms.credentials", {"access_key_id": 1}),
        ("no.such.op", {}),
        ("keys.create", "args"),
    ]
    for op, args in hostile:
        reply = await ch.key_op(op, args)  # type: ignore[arg-type]
        assert reply["ok"] is False and reply["error"]["code"] and reply["error"]["message"], (op, reply)
    await ch.close()


async def test_a_failed_rotation_leaves_the_keyring_as_it_was(tmp_path: Path, sock_dir: Path) -> None:
    # an unwrap (or a new data key) waits for KMS at most 3 s here, not the default 30 s
    stage = await Stage(tmp_path, sock_dir).start(enclaves=1, env={"ENCLAVE_UNWRAP_TIMEOUT_S": "3"})
    try:
        await _failed_rotation(stage)
    finally:
        await stage.stop()


async def _failed_rotation(stage: Stage) -> None:
    import aiohttp

    key = await _op(stage).create_key("secp256k1", "kr")
    async with aiohttp.ClientSession() as s:  # KMS throttles every call: GenerateDataKey never succeeds
        await s.post(f"{stage.kms_url}/_dev/throttle", json={"next": 10_000})
    try:
        with pytest.raises(Exception) as info:
            await _op(stage).rotate_dek("kr")
        assert "kms_throttled" in str(info.value) or "kms" in str(info.value)
    finally:
        async with aiohttp.ClientSession() as s:
            await s.post(f"{stage.kms_url}/_dev/throttle", json={"next": 0})
    assert not list((stage.tmp / "keystore").rglob("envelope.v2.*"))
    req = digest_req("after", key["key_id"])
    res = (await _sign(stage, [req]))[0]
    assert res["status"] == "ok" and recovered(req, res) == key["address"]
    rotated = await _op(stage).rotate_dek("kr")  # and a later rotation works
    assert rotated["dek_version"] == 2


async def _sign(stage: Stage, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert stage.backend is not None
    return await stage.backend.sign_many([(r["key_id"], msgpack.packb(r)) for r in reqs])
