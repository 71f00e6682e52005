"""The enclave's refusal: one exception type carrying a code from the result-code catalogue.

``code`` and ``message`` become the result's (or key-operation reply's) ``error``;
``status`` is the SignResult status (`error`, `rejected` or `expired`). Every layer
of the enclave raises this rather than inventing its own coded exception.
"""

from __future__ import annotations


class Refusal(Exception):
    def __init__(self, code: str, message: str, status: str = "rejected") -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message[:300]}
