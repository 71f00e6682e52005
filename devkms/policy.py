"""A subset of KMS key-policy evaluation: Allow/Deny statements, actions, and the
StringEquals / StringEqualsIgnoreCase conditions on request context keys such as
kms:RecipientAttestation:ImageSha384, kms:RecipientAttestation:PCR<n> and
kms:EncryptionContext:<key>. A condition on a key the request lacks is false,
as in AWS, so an attestation-bound statement never matches a call without one.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any

DEFAULT_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Sid": "dev-default", "Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
    }
)


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def _condition_holds(condition: dict[str, Any], context: dict[str, str]) -> bool:
    for op, tests in condition.items():
        if op not in ("StringEquals", "StringEqualsIgnoreCase"):
            return False  # an operator we do not implement never grants anything
        for key, wanted in tests.items():
            have = context.get(key)
            if have is None:
                return False
            values = [str(v) for v in _as_list(wanted)]
            if op == "StringEqualsIgnoreCase":
                if have.lower() not in (v.lower() for v in values):
                    return False
            elif have not in values:
                return False
    return True


def is_allowed(policy_json: str, action: str, context: dict[str, str]) -> bool:
    policy = json.loads(policy_json)
    allowed = False
    for st in _as_list(policy.get("Statement", [])):
        actions = _as_list(st.get("Action", []))
        if not any(fnmatch.fnmatchcase(action, a) for a in actions):
            continue
        if not _condition_holds(st.get("Condition", {}), context):
            continue
        if st.get("Effect") == "Deny":
            return False
        if st.get("Effect") == "Allow":
            allowed = True
    return allowed


ADMIN_ACTIONS = ("kms:DescribeKey", "kms:PutKeyPolicy")


def attested_keyring_policy(image_sha384: str, admin_actions: tuple[str, ...] = ADMIN_ACTIONS) -> str:
    """The policy a keyring CMK gets: plaintext-returning calls only to the attested enclave image."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "admin", "Effect": "Allow", "Action": list(admin_actions), "Resource": "*"},
                {
                    "Sid": "enclave-only",
                    "Effect": "Allow",
                    "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
                    "Resource": "*",
                    "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": image_sha384}},
                },
            ],
        }
    )


def admin_only_policy(admin_actions: tuple[str, ...] = ADMIN_ACTIONS) -> str:
    """A new keyring key's policy until the enclave image is measured: nothing for anyone's data."""
    return json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Sid": "admin", "Effect": "Allow", "Action": list(admin_actions), "Resource": "*"}]}
    )  # fmt: skip
