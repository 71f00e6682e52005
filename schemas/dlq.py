"""DLQ record: an input that could not be decoded or validated, or that was refused as a poison
request (it kept killing enclave connections), kept with its original bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1


@dataclass(frozen=True, slots=True)
class DlqRecord:
    reason: str  # a catalogue code on the DLQ surface (schemas.refusals): a SchemaError's, or Code.POISON_REQUEST
    message: str
    topic: str
    partition: int
    offset: int
    original: bytes | None  # the record value exactly as consumed
    original_key: bytes | None = None
    request_id: str | None = None  # when the input got far enough to name one
    v: int = VERSION

    def to_wire(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "v": self.v,
            "reason": str(self.reason),  # a Code is sent as its plain string
            "message": self.message,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "original": self.original,
            "original_key": self.original_key,
        }
        if self.request_id is not None:
            m["request_id"] = self.request_id
        return m

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> DlqRecord:
        m = msgpack.unpackb(raw, raw=False)
        return cls(
            m["reason"], m["message"], m["topic"], m["partition"], m["offset"],
            m.get("original"), m.get("original_key"), m.get("request_id"), m.get("v", VERSION),
        )  # fmt: skip
