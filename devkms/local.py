"""Using the dev KMS locally: its credentials, the keyring KMS key bound to this enclave code,
and the environment an enclave worker needs to reach it. One place for the local cluster,
the CLI, the benchmarks and the tests."""

from __future__ import annotations

import os
from pathlib import Path

DEV_ACCESS_KEY_ID = "AKIADEVKMS000000000"
DEV_SECRET_ACCESS_KEY = "devkms-secret-access-key"  # dev credentials, documented


def dev_credentials() -> dict[str, str]:
    """SIGNER_KMS_ACCESS_KEY_ID / SIGNER_KMS_SECRET_ACCESS_KEY, defaulting to the dev KMS's."""
    return {
        "SIGNER_KMS_ACCESS_KEY_ID": os.environ.get("SIGNER_KMS_ACCESS_KEY_ID", DEV_ACCESS_KEY_ID),
        "SIGNER_KMS_SECRET_ACCESS_KEY": os.environ.get("SIGNER_KMS_SECRET_ACCESS_KEY", DEV_SECRET_ACCESS_KEY),
    }


def dev_enclave_env(kms_url: str, kms_data_dir: Path) -> dict[str, str]:
    """Environment for an enclave worker using the dev KMS and its dev attestation PKI."""
    return {
        **dev_credentials(),
        "SIGNER_KMS_ENDPOINT": kms_url,
        "ENCLAVE_ATTESTATION": "dev",
        "ENCLAVE_DEV_PKI": str(kms_data_dir / "pki"),
    }


async def create_keyring_key(kms_url: str, pcr0_hex: str | None = None, description: str = "") -> str:
    """A KMS key whose policy releases data keys only to this enclave code (or the given PCR0)."""
    from enclave_worker.attestation import measure_enclave_code
    from enclave_worker.kms import KmsClient, KmsConfig

    from .policy import attested_keyring_policy

    creds = dev_credentials()
    client = KmsClient(KmsConfig(kms_url, access_key_id=creds["SIGNER_KMS_ACCESS_KEY_ID"],
                                 secret_access_key=creds["SIGNER_KMS_SECRET_ACCESS_KEY"]))  # fmt: skip
    try:
        return await client.create_key(attested_keyring_policy(pcr0_hex or measure_enclave_code().hex()), description)
    finally:
        await client.close()
