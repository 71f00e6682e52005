"""A malformed enclave reply to a key operation is an error reply for the operator, never an
exception that stops the host's admin lane."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schemas.refusals import Code
from signer.keys import KeyManager, KeyOpError
from signer.keystore import DirectoryKeyStore


class _ScriptedPool:  # the pool seam: answers key operations as scripted
    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply

    async def key_op(self, op: str, args: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {"ok": True, "result": {}} if op == "keyrings.load" else self.reply

    async def broadcast(self, *a: Any, **k: Any) -> None:
        pass


@pytest.mark.parametrize(
    "result",
    [{}, {"sealed": {"key_id": 5}}, {"sealed": "x", "key": {}}, {"envelope": {"v": 9}, "sealed": {}}],
    ids=["empty", "bad record", "not a map", "bad envelope"],
)
async def test_a_malformed_enclave_reply_is_an_error_reply(tmp_path: Path, result: dict[str, Any]) -> None:
    keys = KeyManager(_ScriptedPool({"ok": True, "result": result, "enclave_id": "e"}),  # type: ignore[arg-type]
                      DirectoryKeyStore(tmp_path))  # fmt: skip
    with pytest.raises(KeyOpError) as info:
        await keys.handle("keys.create", {"enclave_id": "e", "keyring": "kr", "operation": b"o", "approvals": []})
    assert info.value.code in (Code.INTERNAL, Code.INVALID_RECORD)
