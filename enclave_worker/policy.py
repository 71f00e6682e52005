"""Per-key signing policy, enforced inside the enclave.

A key's policy is fixed when the key is created and sealed with it (it is part
of the sealed key's associated data), so a host cannot alter it: a tampered
policy makes the key fail to open. An absent policy means no restriction.

    {
      "schemes": ["eth_tx", "eth_typed_data"],     # allowed request schemes
      "chain_ids": [1, 10],                         # eth_tx chainId / EIP-712 domain chainId
      "to_allowlist": ["0x...", ...],               # eth_tx destinations (contract creation is refused)
      "max_value": "0xde0b6b3a7640000",            # eth_tx value cap in wei (int or hex string)
      "require_auth": true,                         # requests must be signed by one of `clients`
      "clients": {"payments-svc": {"scheme": "ed25519", "public_key": "hex"}}
    }
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.eth_tx import EthTx
from schemas.sign_request import SCHEMES

from .eip712 import domain_chain_id

CLIENT_SCHEMES = ("ed25519", "secp256k1")
MAX_CLIENTS = 64
MAX_ALLOWLIST = 1024


class PolicyError(ValueError):
    """A policy document that cannot be accepted (at key creation)."""


class PolicyViolation(Exception):
    """A request the key's policy refuses; ``code`` goes into the `rejected` result."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class Client:
    client_id: str
    scheme: str
    public_key: bytes


@dataclass(frozen=True)
class KeyPolicy:
    schemes: frozenset[str] | None = None
    chain_ids: frozenset[int] | None = None
    to_allowlist: frozenset[bytes] | None = None
    max_value: int | None = None
    require_auth: bool = False
    clients: dict[str, Client] = field(default_factory=dict)

    def check(self, scheme: str, payload: Any, tx: EthTx | None) -> None:
        """Raise PolicyViolation if this request may not be signed."""
        if self.schemes is not None and scheme not in self.schemes:
            raise PolicyViolation("policy_scheme", f"this key may not sign {scheme}")
        if tx is not None:
            if self.chain_ids is not None and tx.chain_id not in self.chain_ids:
                raise PolicyViolation("policy_chain_id", f"chain {tx.chain_id} is not allowed for this key")
            if self.to_allowlist is not None and tx.to not in self.to_allowlist:
                what = "contract creation" if not tx.to else f"destination 0x{tx.to.hex()}"
                raise PolicyViolation("policy_destination", f"{what} is not on this key's allow-list")
            if self.max_value is not None and tx.value > self.max_value:
                raise PolicyViolation("policy_value_cap", f"value {tx.value} exceeds this key's cap {self.max_value}")
        if scheme == "eth_typed_data" and self.chain_ids is not None and type(payload) is dict:
            chain = domain_chain_id(payload)
            if chain is None or chain not in self.chain_ids:
                raise PolicyViolation("policy_chain_id", "the typed data's domain chainId is not allowed")


def parse_policy(raw: Any) -> KeyPolicy | None:
    """Validate a policy document; None for no policy. Raises PolicyError."""
    if raw is None:
        return None
    if type(raw) is not dict:
        raise PolicyError("a policy must be a map")
    unknown = set(raw) - {"schemes", "chain_ids", "to_allowlist", "max_value", "require_auth", "clients"}
    if unknown:
        raise PolicyError(f"unknown policy fields {sorted(unknown)}")
    schemes = chain_ids = allow = None
    if "schemes" in raw:
        if type(raw["schemes"]) is not list or not set(raw["schemes"]) <= set(SCHEMES):
            raise PolicyError(f"schemes must be a list drawn from {SCHEMES}")
        schemes = frozenset(raw["schemes"])
    if "chain_ids" in raw:
        if type(raw["chain_ids"]) is not list or not all(type(c) is int and c > 0 for c in raw["chain_ids"]):
            raise PolicyError("chain_ids must be a list of positive integers")
        chain_ids = frozenset(raw["chain_ids"])
    if "to_allowlist" in raw:
        items = raw["to_allowlist"]
        if type(items) is not list or len(items) > MAX_ALLOWLIST:
            raise PolicyError(f"to_allowlist must be a list of at most {MAX_ALLOWLIST} addresses")
        allow = frozenset(_address(a) for a in items)
    max_value = None
    if "max_value" in raw:
        v = raw["max_value"]
        try:
            max_value = v if type(v) is int else int(v, 16) if type(v) is str and v.startswith("0x") else None
        except ValueError:
            max_value = None
        if max_value is None or max_value < 0:
            raise PolicyError("max_value must be a non-negative integer or 0x hex string (wei)")
    require_auth = raw.get("require_auth", False)
    if type(require_auth) is not bool:
        raise PolicyError("require_auth must be true or false")
    clients = _clients(raw.get("clients", {}))
    if require_auth and not clients:
        raise PolicyError("require_auth needs at least one client")
    return KeyPolicy(schemes, chain_ids, allow, max_value, require_auth, clients)


def _address(a: Any) -> bytes:
    if type(a) is str and a.startswith("0x") and len(a) == 42:
        try:
            return bytes.fromhex(a[2:])
        except ValueError:
            pass
    if type(a) is bytes and len(a) == 20:
        return a
    raise PolicyError(f"{str(a)[:50]!r} is not a 20-byte address")


def _clients(raw: Any) -> dict[str, Client]:
    if type(raw) is not dict or len(raw) > MAX_CLIENTS:
        raise PolicyError(f"clients must be a map of at most {MAX_CLIENTS} client ids")
    out = {}
    for cid, spec in raw.items():
        if type(cid) is not str or not 1 <= len(cid) <= 64 or type(spec) is not dict:
            raise PolicyError("each client is client_id -> {scheme, public_key}")
        scheme, pub = spec.get("scheme"), spec.get("public_key")
        if scheme not in CLIENT_SCHEMES or type(pub) is not str:
            raise PolicyError(f"client {cid}: scheme must be one of {CLIENT_SCHEMES} and public_key hex")
        try:
            key = bytes.fromhex(pub.removeprefix("0x"))
        except ValueError:
            raise PolicyError(f"client {cid}: public_key is not hex") from None
        if (scheme == "ed25519" and len(key) != 32) or (scheme == "secp256k1" and len(key) not in (33, 65)):
            raise PolicyError(f"client {cid}: a {scheme} public key has the wrong length")
        out[cid] = Client(cid, scheme, key)
    return out
