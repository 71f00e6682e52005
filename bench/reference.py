"""The reference design (the AWS Nitro samples), measured through the same dev KMS.

Per request: a new connection to the enclave, a fresh RSA-2048 key pair, a fresh
attestation document over it, one KMS Decrypt with Recipient for the data key,
CMS opened, the wallet key unsealed, one signature, connection closed.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclave_worker.attestation import DevProvider
from enclave_worker.cms import open_enveloped_data
from enclave_worker.keyring import unseal
from enclave_worker.kms import KmsClient
from enclave_worker.wallets import wallet_from_secret
from schemas import frames
from schemas.records import KeyringEnvelope, SealedKey
from schemas.transport import open_channel


async def reference_rate(
    enclave_url: str, kms: KmsClient, provider: DevProvider, env: KeyringEnvelope, sealed: SealedKey, n: int
) -> dict[str, Any]:
    import base64
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    t0 = time.perf_counter()
    for i in range(n):
        reader, writer = await open_channel(enclave_url)  # a connection per request
        await frames.read_frame(reader)
        key = rsa.generate_private_key(65537, 2048)  # a fresh key pair per request
        spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        doc = provider.document(public_key=spki)
        recipient = {
            "AttestationDocument": base64.b64encode(doc).decode(),
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        }
        _, cms, answered_by = await kms.decrypt(env.encrypted_dek, env.kms_context(), recipient, key_id=env.kms_key_id)
        assert cms is not None and answered_by == env.kms_key_id  # the enclave checks which key answered, too
        dek = open_enveloped_data(cms, key)
        wallet = wallet_from_secret(sealed.key_id, sealed.scheme, unseal(AESGCM(dek), sealed))
        wallet.private.sign_recoverable(os.urandom(32), hasher=None)
        # the sample's round trip: the request goes over the new connection and comes back
        req = msgpack.packb({"v": 1, "request_id": f"ref{i}", "key_id": sealed.key_id, "scheme": "secp256k1_digest",
                             "payload": os.urandom(32)})  # fmt: skip
        await frames.write_frame(writer, frames.encode_frame({"t": frames.SIGN, "items": [[i, req]]}))
        await frames.read_frame(reader)
        writer.close()
        await writer.wait_closed()
    elapsed = time.perf_counter() - t0
    return {"requests": n, "seconds": round(elapsed, 3), "per_second": round(n / elapsed, 2)}
