"""Key-management requests on `sign.admin` and their replies (e.g. `signer keys create`)."""

from __future__ import annotations

from typing import Any

from .errors import SchemaError
from .names import NAME_RULE, valid_name
from .refusals import Code
from .sign_request import unpack_map
from .validate import as_int, as_str, require

OPS = ("enclave.identity", "keys.create", "keys.list", "keys.import", "keys.rotate_dek")
SIGNED = ("keys.create", "keys.import", "keys.rotate_dek")


def decode_admin_request(raw: bytes) -> dict[str, Any]:
    """{v: 1, request_id, op, args: {...}, reply_topic?} -> validated map.

    create, import and rotate carry an operator-signed `operation` (bytes) and its
    `approvals`; the enclave checks them, the host only relays them."""
    m = unpack_map(raw, 64 * 1024)
    rid = as_str(require(m, "request_id"), "request_id")
    if as_int(require(m, "v", rid), "v", rid) != 1:
        raise SchemaError(Code.INVALID_VALUE, "admin request version must be 1", rid)
    op = as_str(require(m, "op", rid), "op", rid)
    if op not in OPS:
        raise SchemaError(Code.INVALID_VALUE, f"unknown op '{op}', expected one of {OPS}", rid)
    args = m.get("args") or {}
    if type(args) is not dict:
        raise SchemaError(Code.INVALID_VALUE, "'args' must be a map", rid)
    keyring = args.get("keyring")
    if keyring is not None and not valid_name(keyring):
        raise SchemaError(Code.INVALID_VALUE, f"'args.keyring' must be {NAME_RULE}", rid)
    if op in SIGNED or op == "keys.list":
        if type(args.get("enclave_id")) is not str:
            raise SchemaError(Code.INVALID_VALUE, "'args.enclave_id' (from enclave.identity) is required", rid)
    if op in SIGNED:
        if type(args.get("operation")) is not bytes or type(args.get("approvals")) is not list:
            raise SchemaError(Code.INVALID_VALUE, f"{op} needs an operator-signed 'operation' and its 'approvals'", rid)
    if op == "keys.import" and type(args.get("encrypted_key")) is not bytes:
        raise SchemaError(Code.INVALID_VALUE, "'args.encrypted_key' must be bytes", rid)
    if op == "keys.list" and type(args.get("nonce")) is not bytes:
        raise SchemaError(Code.INVALID_VALUE, "'args.nonce' must be bytes", rid)
    reply_topic = m.get("reply_topic")
    if reply_topic is not None:
        as_str(reply_topic, "reply_topic", rid, max_len=249)
    return {"request_id": rid, "op": op, "args": args, "reply_topic": reply_topic}
