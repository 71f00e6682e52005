"""Typed errors for the wire contract: every refusal has a stable code."""

from __future__ import annotations


class SchemaError(ValueError):
    """A message that does not satisfy the wire contract.

    ``code`` is stable and machine-readable (it becomes a DLQ reason or a
    result error code); ``message`` is for humans; ``request_id`` is set when
    the message got far enough to name one.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


# reason / error codes (documented in schemas/README.md)
MALFORMED = "malformed"  # not msgpack, or trailing bytes
TOO_LARGE = "too_large"  # message above the size limit
NOT_A_MAP = "not_a_map"
UNSUPPORTED_VERSION = "unsupported_version"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
INVALID_VALUE = "invalid_value"
UNKNOWN_SCHEME = "unknown_scheme"
INVALID_PAYLOAD = "invalid_payload"
