"""Using the dev KMS locally: its credentials, the keyring KMS key bound to the enclave's code
and configuration, a dev operator key, and the environment an enclave worker needs. One place
for the local cluster, the CLI, the benchmarks and the tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEV_ACCESS_KEY_ID = "AKIADEVKMS000000000"
DEV_SECRET_ACCESS_KEY = "devkms-secret-access-key"  # dev credentials, documented
DEV_REGION = "us-east-1"


def dev_credentials() -> dict[str, str]:
    """SIGNER_KMS_ACCESS_KEY_ID / SIGNER_KMS_SECRET_ACCESS_KEY, defaulting to the dev KMS's."""
    return {
        "SIGNER_KMS_ACCESS_KEY_ID": os.environ.get("SIGNER_KMS_ACCESS_KEY_ID", DEV_ACCESS_KEY_ID),
        "SIGNER_KMS_SECRET_ACCESS_KEY": os.environ.get("SIGNER_KMS_SECRET_ACCESS_KEY", DEV_SECRET_ACCESS_KEY),
    }


@dataclass(frozen=True)
class DevEnclave:
    """A dev enclave configuration and everything that goes with it."""

    config_path: Path
    kms_url: str
    kms_key_arn: str
    pcr0: str
    operator_key_path: Path
    root_path: Path  # the dev attestation root operators verify enclaves against
    env: dict[str, str]  # an enclave worker's environment

    def admin(self, call: Any) -> Any:
        """An operator session (signer.operator.AdminSession) over `call` with the dev operator key."""
        from cryptography import x509

        from signer.operator import AdminSession, OperatorKey

        root = x509.load_der_x509_certificate(self.root_path.read_bytes())
        return AdminSession(call, [OperatorKey.load(self.operator_key_path)], root, self.pcr0)

    def cli_env(self) -> dict[str, str]:
        """What `python -m signer keys ...` needs to act as the dev operator."""
        return {"SIGNER_OPERATOR_KEY": str(self.operator_key_path), "SIGNER_ATTESTATION_ROOT": str(self.root_path),
                "SIGNER_EXPECT_PCR0": self.pcr0}  # fmt: skip


def dev_config(kms_url: str, key_arns: list[str], operators: dict[str, str], quorum: int = 1) -> bytes:
    """The bytes of a dev enclave configuration (see enclave_worker/trust.py)."""
    body = {"v": 1, "attestation": "dev", "kms": {"endpoint": kms_url, "region": DEV_REGION, "key_arns": key_arns},
            "operators": operators, "quorum": quorum}  # fmt: skip
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


async def provision_dev_enclave(
    kms_url: str, kms_data_dir: Path, out_dir: Path, kms_key_arn: str | None = None
) -> DevEnclave:
    """Make (or reuse) a dev operator key and a keyring KMS key, write the enclave configuration
    naming them, measure code + configuration (the dev PCR0), and set the KMS key's policy to
    release data keys only to that measurement."""
    from enclave_worker.attestation import measure_enclave_code

    from .policy import admin_only_policy, attested_keyring_policy

    op_path, op_id, op_public = await asyncio.to_thread(_operator_key, out_dir)
    config_path = out_dir / "enclave-config.json"
    async with _dev_kms_client(kms_url) as client:
        arn = kms_key_arn or await client.create_key(admin_only_policy(), "signer keyrings (dev)")
        config = dev_config(kms_url, [arn], {op_id: op_public})
        await asyncio.to_thread(config_path.write_bytes, config)
        pcr0 = measure_enclave_code(config).hex()
        await client.put_key_policy(arn, attested_keyring_policy(pcr0))
    env = {**dev_credentials(), "ENCLAVE_CONFIG": str(config_path), "ENCLAVE_DEV_PKI": str(kms_data_dir / "pki")}
    return DevEnclave(config_path, kms_url, arn, pcr0, op_path, kms_data_dir / "pki" / "root.der", env)


def _operator_key(out_dir: Path) -> tuple[Path, str, str]:
    """The dev operator's key file in out_dir (made on first use): (path, operator id, public key hex)."""
    from signer.operator import OperatorKey

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "operator.pem"
    operator = OperatorKey.load(path) if path.exists() else OperatorKey.create(path)
    return path, operator.operator_id, operator.public_hex


def dev_kms_client(kms_url: str) -> Any:
    """An enclave_worker.kms.KmsClient for the dev KMS, signing with the dev credentials (the caller closes it)."""
    from enclave_worker.kms import KmsClient, KmsConfig

    creds = dev_credentials()
    return KmsClient(KmsConfig(kms_url, region=DEV_REGION, access_key_id=creds["SIGNER_KMS_ACCESS_KEY_ID"],
                               secret_access_key=creds["SIGNER_KMS_SECRET_ACCESS_KEY"]))  # fmt: skip


@contextlib.asynccontextmanager
async def _dev_kms_client(kms_url: str) -> AsyncIterator[Any]:
    client = dev_kms_client(kms_url)
    try:
        yield client
    finally:
        await client.close()
