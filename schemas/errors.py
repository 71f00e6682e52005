"""Wire-contract violations: a message that cannot be decoded or validated."""

from __future__ import annotations

from .refusals import Code, Refused


class SchemaError(Refused, ValueError):
    """A message that does not satisfy the wire contract.

    ``code`` is a catalogue code (schemas.refusals; a DLQ reason, and the result's error code
    when the enclave re-validates a request); ``message`` is for humans; ``request_id`` is set
    when the message got far enough to name one.
    """

    def __init__(self, code: Code, message: str, request_id: str | None = None) -> None:
        super().__init__(code, message)
        self.request_id = request_id
