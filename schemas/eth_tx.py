"""The `eth_tx` payload: an Ethereum transaction as eth-account's sign_transaction takes it.

Parsing is strict: an unknown field in a transaction is an error (a typo such
as ``maxFeePerGass`` must never be silently dropped from something that moves
money). Both the host (to route and refuse early) and the enclave (which trusts
nothing from the host) parse with this one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import SchemaError
from .keccak import to_checksum_address
from .refusals import Code
from .validate import as_hex_or_bytes, as_int, as_quantity

MAX_CALLDATA = 128 * 1024
MAX_ACCESS_LIST = 256
MAX_STORAGE_KEYS = 1024

_COMMON = {"type", "chainId", "nonce", "to", "value", "data", "gas", "from"}
_ALLOWED = {
    0: _COMMON | {"gasPrice"},
    1: _COMMON | {"gasPrice", "accessList"},
    2: _COMMON | {"maxFeePerGas", "maxPriorityFeePerGas", "accessList"},
}


@dataclass(frozen=True, slots=True)
class EthTx:
    type: int
    chain_id: int
    nonce: int
    gas: int
    to: bytes  # b"" for contract creation
    value: int
    data: bytes
    gas_price: int = 0
    max_fee_per_gas: int = 0
    max_priority_fee_per_gas: int = 0
    access_list: tuple[tuple[bytes, tuple[bytes, ...]], ...] = ()
    sender: bytes | None = None  # optional "from": the enclave checks it is the key's address


def _address(value: Any, name: str, rid: str | None) -> bytes:
    raw = as_hex_or_bytes(value, name, rid, max_len=20, exact=20)
    if type(value) is str:
        body = value[2:]
        if body != body.lower() and body != body.upper() and to_checksum_address(raw) != value:
            raise SchemaError(Code.INVALID_PAYLOAD, f"'{name}' fails its EIP-55 checksum", rid)
    return raw


def parse_eth_tx(payload: Any, rid: str | None = None) -> EthTx:
    """Validate an ``eth_tx`` payload map and return it normalized; raise SchemaError."""
    if type(payload) is not dict:
        raise SchemaError(Code.INVALID_PAYLOAD, "eth_tx payload must be a map", rid)
    if "type" in payload:
        tx_type = as_quantity(payload["type"], "payload.type", rid)
    elif "maxFeePerGas" in payload or "maxPriorityFeePerGas" in payload:
        tx_type = 2
    elif "accessList" in payload:
        tx_type = 1
    else:
        tx_type = 0
    if tx_type not in _ALLOWED:
        raise SchemaError(Code.INVALID_PAYLOAD, f"unsupported transaction type {tx_type}", rid)
    unknown = set(payload) - _ALLOWED[tx_type]
    if unknown:
        raise SchemaError(
            Code.INVALID_PAYLOAD, f"fields not valid for a type {tx_type} transaction: {sorted(unknown)}", rid
        )

    def q(name: str, default: int | None = None) -> int:
        if name not in payload:
            if default is None:
                raise SchemaError(Code.INVALID_PAYLOAD, f"eth_tx field '{name}' is required", rid)
            return default
        return as_quantity(payload[name], f"payload.{name}", rid)

    # a chain id is required for every type: a signature without one replays on any chain
    chain_id = q("chainId")
    if chain_id == 0:
        raise SchemaError(Code.INVALID_PAYLOAD, "chainId must be positive", rid)
    to_raw = payload.get("to")
    to = b"" if to_raw in (None, b"", "", "0x") else _address(to_raw, "payload.to", rid)
    data = as_hex_or_bytes(payload["data"], "payload.data", rid, max_len=MAX_CALLDATA) if "data" in payload else b""
    sender = _address(payload["from"], "payload.from", rid) if "from" in payload else None
    access_list = _access_list(payload.get("accessList", []), rid)
    if tx_type == 2:
        max_fee, prio = q("maxFeePerGas"), q("maxPriorityFeePerGas")
        if prio > max_fee:
            raise SchemaError(Code.INVALID_PAYLOAD, "maxPriorityFeePerGas exceeds maxFeePerGas", rid)
        return EthTx(2, chain_id, q("nonce"), q("gas"), to, q("value", 0), data,
                     max_fee_per_gas=max_fee, max_priority_fee_per_gas=prio,
                     access_list=access_list, sender=sender)  # fmt: skip
    return EthTx(tx_type, chain_id, q("nonce"), q("gas"), to, q("value", 0), data,
                 gas_price=q("gasPrice"), access_list=access_list, sender=sender)  # fmt: skip


def _access_list(value: Any, rid: str | None) -> tuple[tuple[bytes, tuple[bytes, ...]], ...]:
    if type(value) is not list or len(value) > MAX_ACCESS_LIST:
        raise SchemaError(Code.INVALID_PAYLOAD, f"accessList must be a list of at most {MAX_ACCESS_LIST}", rid)
    out = []
    for i, entry in enumerate(value):
        if type(entry) is not dict or set(entry) != {"address", "storageKeys"}:
            raise SchemaError(Code.INVALID_PAYLOAD, f"accessList[{i}] must be a map of address and storageKeys", rid)
        keys = entry["storageKeys"]
        if type(keys) is not list or len(keys) > MAX_STORAGE_KEYS:
            raise SchemaError(Code.INVALID_PAYLOAD, f"accessList[{i}].storageKeys must be a list", rid)
        out.append(
            (
                _address(entry["address"], f"accessList[{i}].address", rid),
                tuple(as_hex_or_bytes(k, "storageKey", rid, max_len=32, exact=32) for k in keys),
            )
        )
    return tuple(out)


__all__ = ["EthTx", "as_int", "parse_eth_tx"]
