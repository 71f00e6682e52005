"""The dev KMS: a real HTTP server speaking the AWS KMS JSON 1.1 protocol subset the signer uses.

Operations: CreateKey, DescribeKey, EnableKey, DisableKey, PutKeyPolicy, Encrypt, Decrypt,
GenerateDataKey, GenerateDataKeyWithoutPlaintext - with `Recipient` on Decrypt
and GenerateDataKey: the attestation document is verified against the dev root
CA, the key policy is evaluated with kms:RecipientAttestation:* context keys,
and the plaintext is returned only as CiphertextForRecipient (CMS EnvelopedData
to the attested RSA key). Requests must carry a valid SigV4 signature.

Key material is kept on disk (data_dir/keys.json) so it survives restarts. This
is a development stand-in: its key material is plaintext on its own disk.

Test controls (not part of KMS): POST /_dev/throttle {"next": N} makes the next
N calls fail with ThrottlingException; GET /_dev/stats counts calls per
operation; POST /_dev/stats/reset clears them.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_der_public_key

from schemas.attestation import AttestationError, verify_attestation

from .pki import ensure_dev_pki
from .policy import DEFAULT_POLICY, is_allowed
from .recipient import envelope_for_recipient
from .sigv4 import SignatureError, verify_sigv4

ACCOUNT = "000000000000"
_BLOB_MAGIC = b"DKM1"


class KmsFault(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise KmsFault("ValidationException", f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise KmsFault("ValidationException", f"{name} is not valid base64") from None


def _context_aad(context: dict[str, str]) -> bytes:
    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


class DevKms:
    def __init__(self, data_dir: Path, region: str, credentials: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.region = region
        self.credentials = credentials
        self.pki = ensure_dev_pki(data_dir / "pki")
        self._state_path = data_dir / "keys.json"
        self.keys: dict[str, dict[str, Any]] = {}
        if self._state_path.exists():
            self.keys = json.loads(self._state_path.read_text())["keys"]
        self.calls: Counter[str] = Counter()
        self.throttle_next = 0
        self.throttled = 0

    # -- persistence ---------------------------------------------------------------------------

    def _save(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": self.keys}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._state_path)

    # -- helpers ---------------------------------------------------------------------------------

    def arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{ACCOUNT}:key/{key_id}"

    def _key(self, ref: Any) -> tuple[str, dict[str, Any]]:
        if not isinstance(ref, str) or not ref:
            raise KmsFault("ValidationException", "KeyId is required")
        key_id = ref.rsplit("key/", 1)[-1]
        key = self.keys.get(key_id)
        if key is None:
            raise KmsFault("NotFoundException", f"Key '{self.arn(key_id)}' does not exist")
        return key_id, key

    def _usable(self, key_id: str, key: dict[str, Any]) -> bytes:
        if not key["enabled"]:
            raise KmsFault("DisabledException", f"{self.arn(key_id)} is disabled.")
        return base64.b64decode(key["material"])

    def _authorize(self, key_id: str, key: dict[str, Any], action: str, context: dict[str, str]) -> None:
        if not is_allowed(key["policy"], action, context):
            raise KmsFault(
                "AccessDeniedException",
                f"User is not authorized to perform: {action} on resource: {self.arn(key_id)} "
                "because no resource-based policy allows the action",
            )

    def _recipient(self, body: dict[str, Any], context: dict[str, str]) -> rsa.RSAPublicKey | None:
        recipient = body.get("Recipient")
        if recipient is None:
            return None
        if not isinstance(recipient, dict) or recipient.get("KeyEncryptionAlgorithm") != "RSAES_OAEP_SHA_256":
            raise KmsFault("ValidationException", "Recipient.KeyEncryptionAlgorithm must be RSAES_OAEP_SHA_256")
        document = _unb64(recipient.get("AttestationDocument"), "Recipient.AttestationDocument")
        try:
            doc = verify_attestation(document, self.pki.root)
        except AttestationError as exc:
            raise KmsFault("ValidationException", f"invalid attestation document: {exc}") from None
        if not doc.public_key:
            raise KmsFault("ValidationException", "the attestation document carries no public key")
        try:
            pub = load_der_public_key(doc.public_key)
        except ValueError:
            raise KmsFault("ValidationException", "the attested public key is not a DER SubjectPublicKeyInfo") from None
        if not isinstance(pub, rsa.RSAPublicKey) or pub.key_size != 2048:
            raise KmsFault("ValidationException", "the attested public key must be RSA-2048")
        context["kms:RecipientAttestation:ImageSha384"] = doc.image_sha384
        for index, value in doc.pcrs.items():
            context[f"kms:RecipientAttestation:PCR{index}"] = value.hex()
        return pub

    @staticmethod
    def _encryption_context(body: dict[str, Any], context: dict[str, str]) -> dict[str, str]:
        ec = body.get("EncryptionContext") or {}
        if not isinstance(ec, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ec.items()):
            raise KmsFault("ValidationException", "EncryptionContext must map strings to strings")
        for k, v in ec.items():
            context[f"kms:EncryptionContext:{k}"] = v
        return ec

    def _seal(self, key_id: str, material: bytes, plaintext: bytes, ec: dict[str, str]) -> bytes:
        nonce = os.urandom(12)
        kid = key_id.encode()
        ct = AESGCM(material).encrypt(nonce, plaintext, _context_aad(ec) + kid)
        return _BLOB_MAGIC + struct.pack(">B", len(kid)) + kid + nonce + ct

    def _unseal(self, blob: bytes, ec: dict[str, str]) -> tuple[str, bytes]:
        try:
            if not blob.startswith(_BLOB_MAGIC):
                raise ValueError
            n = blob[4]
            key_id = blob[5 : 5 + n].decode()
            nonce, ct = blob[5 + n : 17 + n], blob[17 + n :]
        except (ValueError, IndexError, UnicodeDecodeError):
            raise KmsFault("InvalidCiphertextException", "the ciphertext is not a valid dev KMS blob") from None
        if key_id not in self.keys:
            raise KmsFault("InvalidCiphertextException", "the ciphertext refers to an unknown key")
        material = self._usable(key_id, self.keys[key_id])
        try:
            return key_id, AESGCM(material).decrypt(nonce, ct, _context_aad(ec) + key_id.encode())
        except InvalidTag:
            raise KmsFault("InvalidCiphertextException", "the ciphertext or encryption context is wrong") from None

    def _plaintext_out(self, plaintext: bytes, recipient: rsa.RSAPublicKey | None) -> dict[str, str]:
        if recipient is None:
            return {"Plaintext": _b64(plaintext)}
        return {"CiphertextForRecipient": _b64(envelope_for_recipient(plaintext, recipient))}

    # -- operations --------------------------------------------------------------------------------

    def CreateKey(self, body: dict[str, Any]) -> dict[str, Any]:
        policy = body.get("Policy") or DEFAULT_POLICY
        try:
            json.loads(policy)
        except (TypeError, ValueError):
            raise KmsFault("MalformedPolicyDocumentException", "Policy is not valid JSON") from None
        key_id = str(uuid.uuid4())
        self.keys[key_id] = {
            "material": _b64(os.urandom(32)),
            "policy": policy,
            "enabled": True,
            "description": str(body.get("Description", "")),
            "created": time.time(),
        }
        self._save()
        return {"KeyMetadata": self._metadata(key_id)}

    def _metadata(self, key_id: str) -> dict[str, Any]:
        key = self.keys[key_id]
        return {
            "AWSAccountId": ACCOUNT,
            "KeyId": key_id,
            "Arn": self.arn(key_id),
            "CreationDate": key["created"],
            "Enabled": key["enabled"],
            "KeyState": "Enabled" if key["enabled"] else "Disabled",
            "Description": key["description"],
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "KeyManager": "CUSTOMER",
        }

    def DescribeKey(self, body: dict[str, Any]) -> dict[str, Any]:
        key_id, key = self._key(body.get("KeyId"))
        self._authorize(key_id, key, "kms:DescribeKey", {})
        return {"KeyMetadata": self._metadata(key_id)}

    def _set_enabled(self, body: dict[str, Any], enabled: bool) -> dict[str, Any]:
        key_id, key = self._key(body.get("KeyId"))
        self._authorize(key_id, key, "kms:EnableKey" if enabled else "kms:DisableKey", {})
        key["enabled"] = enabled
        self._save()
        return {}

    def EnableKey(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._set_enabled(body, True)

    def DisableKey(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._set_enabled(body, False)

    def PutKeyPolicy(self, body: dict[str, Any]) -> dict[str, Any]:
        key_id, key = self._key(body.get("KeyId"))
        self._authorize(key_id, key, "kms:PutKeyPolicy", {})
        policy = body.get("Policy")
        try:
            json.loads(policy)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise KmsFault("MalformedPolicyDocumentException", "Policy is not valid JSON") from None
        key["policy"] = policy
        self._save()
        return {}

    def Encrypt(self, body: dict[str, Any]) -> dict[str, Any]:
        key_id, key = self._key(body.get("KeyId"))
        context: dict[str, str] = {}
        ec = self._encryption_context(body, context)
        self._authorize(key_id, key, "kms:Encrypt", context)
        plaintext = _unb64(body.get("Plaintext"), "Plaintext")
        if not 1 <= len(plaintext) <= 4096:
            raise KmsFault("ValidationException", "Plaintext must be 1 to 4096 bytes")
        blob = self._seal(key_id, self._usable(key_id, key), plaintext, ec)
        return {"CiphertextBlob": _b64(blob), "KeyId": self.arn(key_id), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}

    def Decrypt(self, body: dict[str, Any]) -> dict[str, Any]:
        context: dict[str, str] = {}
        ec = self._encryption_context(body, context)
        recipient = self._recipient(body, context)
        blob = _unb64(body.get("CiphertextBlob"), "CiphertextBlob")
        if body.get("KeyId"):
            wanted, _ = self._key(body["KeyId"])
        key_id, plaintext = self._unseal(blob, ec)
        if body.get("KeyId") and wanted != key_id:
            raise KmsFault("IncorrectKeyException", "the ciphertext was not encrypted under the KeyId given")
        self._authorize(key_id, self.keys[key_id], "kms:Decrypt", context)
        return {"KeyId": self.arn(key_id), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                **self._plaintext_out(plaintext, recipient)}  # fmt: skip

    def _data_key(self, body: dict[str, Any], action: str, with_plaintext: bool) -> dict[str, Any]:
        key_id, key = self._key(body.get("KeyId"))
        context: dict[str, str] = {}
        ec = self._encryption_context(body, context)
        recipient = self._recipient(body, context) if with_plaintext else None
        spec, nbytes = body.get("KeySpec"), body.get("NumberOfBytes")
        if spec is not None:
            sizes = {"AES_256": 32, "AES_128": 16}
            if spec not in sizes or nbytes is not None:
                raise KmsFault("ValidationException", "KeySpec must be AES_256 or AES_128, without NumberOfBytes")
            nbytes = sizes[spec]
        if not isinstance(nbytes, int) or not 1 <= nbytes <= 1024:
            raise KmsFault("ValidationException", "one of KeySpec or NumberOfBytes (1-1024) is required")
        self._authorize(key_id, key, action, context)
        plaintext = os.urandom(nbytes)
        out = {
            "KeyId": self.arn(key_id),
            "CiphertextBlob": _b64(self._seal(key_id, self._usable(key_id, key), plaintext, ec)),
        }
        if with_plaintext:
            out.update(self._plaintext_out(plaintext, recipient))
        return out

    def GenerateDataKey(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._data_key(body, "kms:GenerateDataKey", True)

    def GenerateDataKeyWithoutPlaintext(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._data_key(body, "kms:GenerateDataKeyWithoutPlaintext", False)

    OPERATIONS = (
        "CreateKey", "DescribeKey", "EnableKey", "DisableKey", "PutKeyPolicy", "Encrypt", "Decrypt",
        "GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
    )  # fmt: skip

    # -- HTTP ----------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        body_bytes = await request.read()
        try:
            target = request.headers.get("X-Amz-Target", "")
            service, _, op = target.partition(".")
            if service != "TrentService" or op not in self.OPERATIONS:
                raise KmsFault("UnknownOperationException", f"unknown operation {target!r}")
            verify_sigv4(request.method, f"http://{request.host}{request.path_qs}", request.headers, body_bytes,
                         self.credentials)  # fmt: skip
            self.calls[op] += 1
            if self.throttle_next > 0:
                self.throttle_next -= 1
                self.throttled += 1
                raise KmsFault("ThrottlingException", "Rate exceeded")
            try:
                body = json.loads(body_bytes or b"{}")
            except ValueError:
                raise KmsFault("SerializationException", "body is not JSON") from None
            if not isinstance(body, dict):
                raise KmsFault("SerializationException", "body is not a JSON object")
            result = getattr(self, op)(body)
            return web.json_response(result, content_type="application/x-amz-json-1.1")
        except SignatureError as exc:
            return _fault(exc.code, str(exc), 400)
        except KmsFault as exc:
            return _fault(exc.code, exc.message, exc.status)

    async def throttle(self, request: web.Request) -> web.Response:
        self.throttle_next = int((await request.json()).get("next", 0))
        return web.json_response({"throttle_next": self.throttle_next})

    async def stats(self, _: web.Request) -> web.Response:
        return web.json_response({"calls": dict(self.calls), "throttled": self.throttled})

    async def reset_stats(self, _: web.Request) -> web.Response:
        self.calls.clear()
        self.throttled = 0
        return web.json_response({})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/", self.handle)
        app.router.add_post("/_dev/throttle", self.throttle)
        app.router.add_get("/_dev/stats", self.stats)
        app.router.add_post("/_dev/stats/reset", self.reset_stats)
        return app


def _fault(code: str, message: str, status: int) -> web.Response:
    return web.json_response({"__type": code, "message": message}, status=status,
                             content_type="application/x-amz-json-1.1")  # fmt: skip
