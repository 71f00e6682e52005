"""Verifying AWS SigV4 request signatures, with botocore's own canonicalisation."""

from __future__ import annotations

import datetime as dt
import hmac
import re
from collections.abc import Mapping

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<akid>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request,"
    r"\s*SignedHeaders=(?P<signed>[a-z0-9;-]+),\s*Signature=(?P<sig>[0-9a-f]{64})$"
)


class SignatureError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def verify_sigv4(
    method: str, url: str, headers: Mapping[str, str], body: bytes, secrets: Mapping[str, str], service: str = "kms"
) -> str:
    """Check the request's SigV4 signature; return the access key id or raise SignatureError."""
    lower = {k.lower(): v for k, v in headers.items()}
    m = _AUTH.match(lower.get("authorization", ""))
    if m is None:
        raise SignatureError("MissingAuthenticationTokenException", "request is not SigV4-signed")
    akid = m["akid"]
    if akid not in secrets:
        raise SignatureError("UnrecognizedClientException", "the security token included in the request is invalid")
    if m["service"] != service:
        raise SignatureError("InvalidSignatureException", f"credential scope is for {m['service']}")
    amz_date = lower.get("x-amz-date", "")
    try:
        when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise SignatureError("IncompleteSignatureException", "X-Amz-Date is missing or malformed") from None
    if abs((dt.datetime.now(dt.UTC) - when).total_seconds()) > 300 or not amz_date.startswith(m["date"]):
        raise SignatureError("InvalidSignatureException", "signature expired or date mismatch")
    signed = m["signed"].split(";")
    req = AWSRequest(method=method, url=url, data=body, headers={h: lower[h] for h in signed if h in lower})
    req.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(akid, secrets[akid], lower.get("x-amz-security-token")), service, m["region"])
    expected = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
    if not hmac.compare_digest(expected, m["sig"]):
        raise SignatureError("InvalidSignatureException", "the request signature does not match")
    return akid
