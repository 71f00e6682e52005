"""Per-key signing policy, enforced inside the enclave.

A key's policy is fixed when the key is created and sealed with it (it is part
of the sealed key's associated data), so a host cannot alter it: a tampered
policy makes the key fail to open. An absent policy means no restriction.

    {
      "schemes": ["eth_tx", "eth_typed_data"],     # the schemes this key signs (see below)
      "chain_ids": [1, 10],                         # eth_tx chainId / EIP-712 domain chainId
      "to_allowlist": ["0x...", ...],               # eth_tx destinations (contract creation is refused)
      "max_value": "0xde0b6b3a7640000",            # eth_tx value cap in wei (int or hex string)
      "typed_data_contracts": ["0x...", ...],       # EIP-712 domain verifyingContract allow-list
      "require_auth": true,                         # requests must be signed by one of `clients`
      "clients": {"payments-svc": {"scheme": "ed25519", "public_key": "hex"}}
    }

Deny by default. `chain_ids`, `to_allowlist`, `max_value` and `typed_data_contracts`
are *limits*; each can be checked on some schemes only:

    chain_ids             eth_tx (chainId), eth_typed_data (the domain's chainId)
    to_allowlist          eth_tx
    max_value             eth_tx
    typed_data_contracts  eth_typed_data (the domain's verifyingContract)

Without `schemes`, a key signs a scheme only if every limit its policy sets can be
checked on it: a policy with no limit signs every scheme; one with `chain_ids` alone
signs eth_tx and eth_typed_data; one with `to_allowlist` or `max_value` signs eth_tx
only (a permit or order signed as typed data can move value the policy cannot see);
`secp256k1_digest`, `eth_personal` and `ed25519` are never signed under a limit
unless named, since a raw digest can be the signing hash of a forbidden transaction and
a personal message can authorize a transfer (e.g. a multisig transaction approved by an
`eth_sign` signature). With `schemes`, exactly the schemes it names are signed; the
limits that can be checked on a named scheme are enforced, the others do not restrict
it: naming `secp256k1_digest` next to `to_allowlist` is a deliberate exemption.

Everything in a request is hostile: `check` reads EIP-712 documents through the strict,
bounded domain readers of `eip712` and runs before any digest is computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from schemas.errors import SchemaError
from schemas.eth_tx import EthTx, parse_eth_tx
from schemas.refusals import Code, Refused
from schemas.sign_request import SCHEMES

from .eip712 import TypedDataError, domain_chain_id, domain_verifying_contract

CLIENT_SCHEMES = ("ed25519", "secp256k1")
MAX_CLIENTS = 64
MAX_ALLOWLIST = 1024

# the schemes each limit can be checked on
LIMIT_SCHEMES: dict[str, frozenset[str]] = {
    "chain_ids": frozenset({"eth_tx", "eth_typed_data"}),
    "to_allowlist": frozenset({"eth_tx"}),
    "max_value": frozenset({"eth_tx"}),
    "typed_data_contracts": frozenset({"eth_typed_data"}),
}
_FIELDS = {"schemes", *LIMIT_SCHEMES, "require_auth", "clients"}
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


class PolicyError(Refused, ValueError):
    """A policy document that cannot be accepted: always ``invalid_policy``."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.INVALID_POLICY, message)


class PolicyViolation(Refused):
    """A request the key's policy refuses (a ``policy_*`` code, a `rejected` result)."""


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
    typed_data_contracts: frozenset[bytes] | None = None
    allowed: frozenset[str] = field(init=False, repr=False, compare=False)  # the schemes this key signs

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", self.schemes if self.schemes is not None else self._implicit_schemes())

    @property
    def limits(self) -> tuple[str, ...]:
        """The limits this policy sets, by field name."""
        return tuple(name for name in LIMIT_SCHEMES if getattr(self, name) is not None)

    def _implicit_schemes(self) -> frozenset[str]:
        allowed = frozenset(SCHEMES)
        for name in self.limits:
            allowed &= LIMIT_SCHEMES[name]
        return allowed

    def check(self, scheme: str, payload: Any, tx: EthTx | None) -> None:
        """Raise PolicyViolation if this request may not be signed.

        Reads only what the policy limits, with bounded cost: call it before computing an
        EIP-712 digest (a refused document is then never parsed in full)."""
        if scheme not in self.allowed:
            if self.schemes is not None:
                raise PolicyViolation(Code.POLICY_SCHEME, f"this key may not sign {scheme}")
            unchecked = [n for n in self.limits if scheme not in LIMIT_SCHEMES[n]]
            raise PolicyViolation(Code.POLICY_SCHEME, f"this key's policy sets {', '.join(unchecked)}, which cannot be "
                                  f"checked on {scheme}: it signs {scheme} only if its schemes name it")  # fmt: skip
        if scheme == "eth_tx":
            self._check_tx(payload, tx)
        elif scheme == "eth_typed_data":
            self._check_typed_data(payload)

    def _check_tx(self, payload: Any, tx: EthTx | None) -> None:
        if self.chain_ids is None and self.to_allowlist is None and self.max_value is None:
            return
        if tx is None:  # the caller has not parsed it: never skip the limits for that
            try:
                tx = parse_eth_tx(payload)
            except SchemaError as exc:
                raise PolicyViolation(exc.code, exc.message) from None  # its own code (invalid_payload)
        if self.chain_ids is not None and tx.chain_id not in self.chain_ids:
            raise PolicyViolation(Code.POLICY_CHAIN_ID, f"chain {tx.chain_id} is not allowed for this key")
        if self.to_allowlist is not None and tx.to not in self.to_allowlist:
            what = "contract creation" if not tx.to else f"destination 0x{tx.to.hex()}"
            raise PolicyViolation(Code.POLICY_DESTINATION, f"{what} is not on this key's allow-list")
        if self.max_value is not None and tx.value > self.max_value:
            raise PolicyViolation(Code.POLICY_VALUE_CAP, f"value {tx.value} exceeds this key's cap {self.max_value}")

    def _check_typed_data(self, payload: Any) -> None:
        if self.chain_ids is not None:
            try:
                chain = domain_chain_id(payload)
            except TypedDataError as exc:
                message = f"typed data must name an allowed chain: {exc.message}"
                raise PolicyViolation(Code.POLICY_CHAIN_ID, message) from None
            if chain not in self.chain_ids:
                raise PolicyViolation(Code.POLICY_CHAIN_ID, f"the typed data's domain chainId {chain} is not allowed")
        if self.typed_data_contracts is not None:
            try:
                contract = domain_verifying_contract(payload)
            except TypedDataError as exc:
                message = f"typed data must name an allowed contract: {exc.message}"
                raise PolicyViolation(Code.POLICY_VERIFYING_CONTRACT, message) from None
            if contract not in self.typed_data_contracts:
                message = f"verifyingContract 0x{contract.hex()} is not on this key's allow-list"
                raise PolicyViolation(Code.POLICY_VERIFYING_CONTRACT, message)


def parse_policy(raw: Any) -> KeyPolicy | None:
    """Validate a policy document; None for no policy. Raises PolicyError."""
    if raw is None:
        return None
    if type(raw) is not dict:
        raise PolicyError("a policy must be a map")
    unknown = [k for k in raw if k not in _FIELDS]
    if unknown:
        raise PolicyError(f"unknown policy fields {sorted(str(k)[:40] for k in unknown)}")
    schemes = chain_ids = allow = contracts = None
    if "schemes" in raw:
        items = raw["schemes"]
        if type(items) is not list or not all(type(s) is str and s in SCHEMES for s in items):
            raise PolicyError(f"schemes must be a list drawn from {SCHEMES}")
        schemes = frozenset(items)
    if "chain_ids" in raw:
        items = raw["chain_ids"]
        if type(items) is not list or len(items) > MAX_ALLOWLIST or not all(type(c) is int and c > 0 for c in items):
            raise PolicyError(f"chain_ids must be a list of at most {MAX_ALLOWLIST} positive integers")
        chain_ids = frozenset(items)
    if "to_allowlist" in raw:
        allow = _addresses(raw["to_allowlist"], "to_allowlist")
    if "typed_data_contracts" in raw:
        contracts = _addresses(raw["typed_data_contracts"], "typed_data_contracts")
    max_value = None
    if "max_value" in raw:
        v = raw["max_value"]
        if type(v) is int:
            max_value = v
        elif type(v) is str and re.fullmatch(r"0x[0-9a-fA-F]{1,64}", v):
            max_value = int(v, 16)
        if max_value is None or max_value < 0:
            raise PolicyError("max_value must be a non-negative integer or 0x hex string (wei)")
    require_auth = raw.get("require_auth", False)
    if type(require_auth) is not bool:
        raise PolicyError("require_auth must be true or false")
    clients = _clients(raw.get("clients", {}))
    if require_auth and not clients:
        raise PolicyError("require_auth needs at least one client")
    policy = KeyPolicy(schemes=schemes, chain_ids=chain_ids, to_allowlist=allow, max_value=max_value,
                       require_auth=require_auth, clients=clients, typed_data_contracts=contracts)  # fmt: skip
    if contracts is not None and "eth_typed_data" not in policy.allowed:
        raise PolicyError("typed_data_contracts is set but this policy does not sign eth_typed_data: "
                          "name it in schemes")  # fmt: skip
    return policy


def _addresses(items: Any, name: str) -> frozenset[bytes]:
    if type(items) is not list or len(items) > MAX_ALLOWLIST:
        raise PolicyError(f"{name} must be a list of at most {MAX_ALLOWLIST} addresses")
    return frozenset(_address(a) for a in items)


def _address(a: Any) -> bytes:
    if type(a) is str and _ADDRESS.fullmatch(a):
        return bytes.fromhex(a[2:])
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
