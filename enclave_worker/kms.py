"""A KMS client speaking the AWS KMS JSON 1.1 protocol, signed with SigV4 by botocore.

On Nitro the endpoint is reached through the vsock proxy (the enclave has no
network); here it is any URL, e.g. the dev KMS. Few, persistent connections:
the vsock proxy serves one connection per worker.

Throttling and transport errors are retried with jittered exponential backoff
until the caller's deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

RETRYABLE = {"ThrottlingException", "KMSInternalException", "DependencyTimeoutException", "ServiceUnavailable"}


class KmsError(Exception):
    """A KMS refusal or failure; ``code`` is the AWS error type (e.g. AccessDeniedException)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class KmsConfig:
    endpoint: str
    region: str = "us-east-1"
    access_key_id: str = ""
    secret_access_key: str = ""
    session_token: str | None = None
    timeout_s: float = 10.0
    backoff_min_s: float = 0.05
    backoff_max_s: float = 2.0


@dataclass(frozen=True)
class DataKey:
    ciphertext_blob: bytes
    plaintext: bytes | None  # absent when a Recipient was given
    ciphertext_for_recipient: bytes | None
    key_id: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class KmsClient:
    def __init__(self, config: KmsConfig) -> None:
        self.config = config
        self._credentials = Credentials(config.access_key_id, config.secret_access_key, config.session_token)
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0
        self.throttles = 0

    def set_credentials(self, access_key_id: str, secret_access_key: str, session_token: str | None = None) -> None:
        """New credentials for request signing (on Nitro: the parent's instance-role credentials,
        delivered over the channel and refreshed before they expire)."""
        self._credentials = Credentials(access_key_id, secret_access_key, session_token)

    @property
    def has_credentials(self) -> bool:
        return bool(self._credentials.access_key)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            )
        return self._session

    async def call(self, operation: str, body: dict[str, Any], deadline: float | None = None) -> dict[str, Any]:
        """One KMS operation; retried on throttling/transport errors until `deadline` (monotonic)."""
        deadline = deadline if deadline is not None else time.monotonic() + 30.0
        delay = self.config.backoff_min_s
        while True:
            try:
                return await self._call_once(operation, body)
            except KmsError as exc:
                if exc.code not in RETRYABLE:
                    raise
                if exc.code == "ThrottlingException":
                    self.throttles += 1
                error: Exception = exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = exc
            pause = delay * random.uniform(0.5, 1.5)
            if time.monotonic() + pause > deadline:
                if isinstance(error, KmsError):
                    raise error
                raise KmsError("TransportError", f"KMS unreachable: {error!r}") from error
            await asyncio.sleep(pause)
            delay = min(delay * 2, self.config.backoff_max_s)

    async def _call_once(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        req = AWSRequest(
            method="POST",
            url=self.config.endpoint,
            data=data,
            headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": f"TrentService.{operation}"},
        )
        SigV4Auth(self._credentials, "kms", self.config.region).add_auth(req)
        self.calls += 1
        async with self._session_for_loop().post(
            self.config.endpoint, data=data, headers=dict(req.headers.items())
        ) as resp:
            payload = await resp.read()
            status = resp.status
        try:
            result = json.loads(payload) if payload else {}
        except ValueError:
            raise KmsError("ServiceUnavailable" if status >= 500 else "InvalidResponse", f"HTTP {status}") from None
        if status >= 400:
            code = str(result.get("__type", f"HTTP{status}")).rsplit("#", 1)[-1]
            raise KmsError(code, str(result.get("message") or result.get("Message") or ""))
        return dict(result)

    # -- operations ------------------------------------------------------------------------------------

    async def create_key(self, policy: str | None = None, description: str = "") -> str:
        """-> the new key's ARN."""
        body: dict[str, Any] = {"Description": description}
        if policy is not None:
            body["Policy"] = policy
        return str((await self.call("CreateKey", body))["KeyMetadata"]["Arn"])

    async def put_key_policy(self, key_id: str, policy: str) -> None:
        await self.call("PutKeyPolicy", {"KeyId": key_id, "PolicyName": "default", "Policy": policy})

    async def encrypt(self, key_id: str, plaintext: bytes, context: dict[str, str] | None = None) -> bytes:
        body: dict[str, Any] = {"KeyId": key_id, "Plaintext": _b64(plaintext)}
        if context:
            body["EncryptionContext"] = context
        return base64.b64decode((await self.call("Encrypt", body))["CiphertextBlob"])

    async def decrypt(
        self,
        blob: bytes,
        context: dict[str, str] | None = None,
        recipient: dict[str, str] | None = None,
        key_id: str | None = None,
        deadline: float | None = None,
    ) -> tuple[bytes | None, bytes | None, str | None]:
        """-> (Plaintext, CiphertextForRecipient, KeyId of the answer); with a Recipient only the
        second is set. The caller checks KeyId: it names the KMS key that really decrypted."""
        body: dict[str, Any] = {"CiphertextBlob": _b64(blob)}
        if context:
            body["EncryptionContext"] = context
        if recipient:
            body["Recipient"] = recipient
        if key_id:
            body["KeyId"] = key_id
        out = await self.call("Decrypt", body, deadline)
        key = out.get("KeyId")
        return _opt(out, "Plaintext"), _opt(out, "CiphertextForRecipient"), key if type(key) is str else None

    async def generate_data_key(
        self,
        key_id: str,
        context: dict[str, str] | None = None,
        recipient: dict[str, str] | None = None,
        deadline: float | None = None,
    ) -> DataKey:
        body: dict[str, Any] = {"KeyId": key_id, "KeySpec": "AES_256"}
        if context:
            body["EncryptionContext"] = context
        if recipient:
            body["Recipient"] = recipient
        out = await self.call("GenerateDataKey", body, deadline)
        return DataKey(
            base64.b64decode(out["CiphertextBlob"]),
            _opt(out, "Plaintext"),
            _opt(out, "CiphertextForRecipient"),
            str(out.get("KeyId") or ""),
        )


def _opt(out: dict[str, Any], name: str) -> bytes | None:
    value = out.get(name)
    return base64.b64decode(value) if value else None
