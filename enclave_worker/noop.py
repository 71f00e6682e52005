"""The no-op service: answers sign frames without a key (channel benchmarks and tests only).

A deterministic digest of each request stands in for its signature, so tests can check
exactly-once delivery and determinism through the real frame server.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgpack


def noop_batch(items: list[Any]) -> list[list[Any]]:
    out = []
    for corr_id, raw in items:
        t0 = time.perf_counter_ns()
        try:
            rid = msgpack.unpackb(raw, raw=False).get("request_id", "")
        except Exception:
            rid = ""
        result = {"v": 1, "request_id": rid, "key_id": "", "status": "ok", "signature": hashlib.sha256(raw).digest(),
                  "timings_us": {"enclave_service": (time.perf_counter_ns() - t0) // 1000}}  # fmt: skip
        out.append([corr_id, result])
    return out


class NoopService:
    """The signing service's interface, answering every request at once."""

    def sign_batch(self, items: list[Any]) -> tuple[list[list[Any]], list[Any]]:
        return noop_batch(items), []

    async def sign_deferred(self, deferred: list[Any]) -> list[list[Any]]:
        return []
