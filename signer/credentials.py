"""KMS credentials the host hands to its enclaves.

The enclaves sign their KMS requests with credentials the host gives them (an enclave has no
network and no instance role of its own). They only sign requests: which KMS, which keys and
which key policy are fixed by the enclave's measured configuration.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import structlog

log = structlog.get_logger("credentials")

Credentials = dict[str, str]  # access_key_id, secret_access_key[, session_token]: the kms.credentials key op's args


def kms_credentials(path: str = "", environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials to hand over now, if this host provides any.

    With `path` (SIGNER_KMS_CREDENTIALS_FILE): a JSON file in the shape IMDS serves role credentials
    (AccessKeyId, SecretAccessKey, Token), read again on every call so rotated credentials reach the
    enclaves; unreadable, it gives None (logged). Without: SIGNER_KMS_ACCESS_KEY_ID /
    SIGNER_KMS_SECRET_ACCESS_KEY / SIGNER_KMS_SESSION_TOKEN from the environment, if set."""
    if path:
        try:
            data = json.loads(Path(path).read_text())
            out = {"access_key_id": data["AccessKeyId"], "secret_access_key": data["SecretAccessKey"]}
            if data.get("Token"):
                out["session_token"] = data["Token"]
            return out
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("kms_credentials_unreadable", path=path, error=type(exc).__name__)
            return None
    env = os.environ if environ is None else environ
    ak, sk = env.get("SIGNER_KMS_ACCESS_KEY_ID"), env.get("SIGNER_KMS_SECRET_ACCESS_KEY")
    if not ak or not sk:
        return None
    out = {"access_key_id": ak, "secret_access_key": sk}
    if env.get("SIGNER_KMS_SESSION_TOKEN"):
        out["session_token"] = env["SIGNER_KMS_SESSION_TOKEN"]
    return out
