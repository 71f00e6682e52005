"""The enclave's trust anchors: a configuration file measured with its code.

The enclave trusts its measured code and this configuration, KMS, and
signatures by the operators the configuration names; nothing the host sends
can change any of them. On Nitro the file is baked into the enclave image, so
changing it changes PCR0; in dev attestation mode its bytes are part of the dev
PCR0 measurement, with the same effect (the KMS key policy stops matching).

    {
      "v": 1,
      "attestation": "nsm",                      # "nsm" (Nitro) or "dev"
      "kms": {
        "endpoint": "https://kms.us-east-1.amazonaws.com",   # https unless attestation is "dev"
        "region": "us-east-1",
        "key_arns": ["arn:aws:kms:us-east-1:111122223333:key/..."]  # first: new keyrings
      },
      "operators": {"alice": "<ed25519 public key, hex>", ...},
      "quorum": 1                                # approvals needed for an admin operation
    }
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ATTESTATION_MODES = ("nsm", "dev")
DEFAULT_CONFIG_PATH = "/app/enclave-config.json"
MAX_CONFIG_BYTES = 64 * 1024
_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]{1,128}$")
_OPERATOR_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class ConfigError(ValueError):
    """An enclave configuration that cannot be trusted; the enclave refuses to start."""


@dataclass(frozen=True)
class EnclaveConfig:
    attestation: str
    kms_endpoint: str
    kms_region: str
    key_arns: tuple[str, ...]
    operators: dict[str, Ed25519PublicKey]
    quorum: int
    digest: bytes  # SHA-256 of the file's bytes: what the enclave reports in its identity

    @property
    def new_keyring_key(self) -> str:
        """The KMS key new keyrings (and rotated data keys) are made under."""
        return self.key_arns[0]

    def allows_kms_key(self, arn: str) -> bool:
        return arn in self.key_arns


def load_config(path: str | Path) -> tuple[EnclaveConfig, bytes]:
    """Read and validate the configuration; -> (config, the exact bytes, for measurement)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the enclave configuration {path}: {exc.strerror}") from None
    return parse_config(data), data


def parse_config(data: bytes) -> EnclaveConfig:
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the enclave configuration is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"the enclave configuration is not JSON: {exc}") from None
    if type(raw) is not dict or raw.get("v") != 1:
        raise ConfigError('the enclave configuration must be a JSON object with "v": 1')
    unknown = set(raw) - {"v", "attestation", "kms", "operators", "quorum"}
    if unknown:
        raise ConfigError(f"unknown enclave configuration fields {sorted(unknown)}")
    mode = raw.get("attestation")
    if mode not in ATTESTATION_MODES:
        raise ConfigError(f"attestation must be one of {ATTESTATION_MODES}")
    kms = raw.get("kms")
    if type(kms) is not dict or set(kms) - {"endpoint", "region", "key_arns"}:
        raise ConfigError("kms must be {endpoint, region, key_arns}")
    endpoint, region, arns = kms.get("endpoint"), kms.get("region"), kms.get("key_arns")
    if type(endpoint) is not str or not endpoint.startswith(("https://", "http://")):
        raise ConfigError("kms.endpoint must be an https:// URL")
    if endpoint.startswith("http://") and mode != "dev":
        raise ConfigError("kms.endpoint must use https:// (plain http is allowed only with dev attestation)")
    if type(region) is not str or not re.fullmatch(r"[a-z0-9-]{1,32}", region):
        raise ConfigError("kms.region must be an AWS region name")
    if type(arns) is not list or not 1 <= len(arns) <= 16 or not all(type(a) is str and _ARN.match(a) for a in arns):
        raise ConfigError("kms.key_arns must list 1-16 KMS key ARNs (arn:aws:kms:REGION:ACCOUNT:key/ID)")
    operators = _operators(raw.get("operators"))
    quorum = raw.get("quorum", 1)
    if type(quorum) is not int or not 1 <= quorum <= len(operators):
        raise ConfigError(f"quorum must be an integer from 1 to the number of operators ({len(operators)})")
    return EnclaveConfig(mode, endpoint, region, tuple(arns), operators, quorum, hashlib.sha256(data).digest())


def _operators(raw: Any) -> dict[str, Ed25519PublicKey]:
    if type(raw) is not dict or not 1 <= len(raw) <= 32:
        raise ConfigError("operators must map 1-32 operator ids to ed25519 public keys (hex)")
    out = {}
    for op_id, pub in raw.items():
        if type(op_id) is not str or not _OPERATOR_ID.match(op_id) or type(pub) is not str:
            raise ConfigError("each operator is an id (letters, digits, _.@-) -> ed25519 public key hex")
        try:
            out[op_id] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub.removeprefix("0x")))
        except ValueError:
            raise ConfigError(f"operator {op_id}: not a 32-byte ed25519 public key in hex") from None
    return out
