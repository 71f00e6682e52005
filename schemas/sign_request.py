"""SignRequest: what upstream producers put on `sign.requests` (WIRE.md v1)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import msgpack

from .errors import SchemaError
from .eth_tx import parse_eth_tx
from .refusals import Code
from .validate import ContainerBudget, OverBudget, as_bytes, as_int, as_str, require

VERSION = 1
SCHEMES = ("eth_tx", "eth_personal", "eth_typed_data", "secp256k1_digest", "ed25519")
_SCHEME_SET = frozenset(SCHEMES)
MAX_REQUEST_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 64 * 1024  # eth_personal / ed25519 message
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class SignRequest(NamedTuple):
    """A decoded, validated request. Immutable; a NamedTuple rather than a frozen dataclass because
    one is built per request on the host and in the enclave, and a frozen dataclass's __init__
    costs several microseconds (a fifth of a signature)."""

    request_id: str
    key_id: str
    scheme: str
    payload: Any
    deadline_ms: int | None = None
    reply_topic: str | None = None
    auth: dict[str, Any] | None = None
    v: int = VERSION
    parsed: Any = None  # e.g. the EthTx of an eth_tx payload (not part of the wire form)

    def to_wire(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "v": self.v,
            "request_id": self.request_id,
            "key_id": self.key_id,
            "scheme": self.scheme,
            "payload": self.payload,
        }
        if self.deadline_ms is not None:
            m["deadline_ms"] = self.deadline_ms
        if self.reply_topic is not None:
            m["reply_topic"] = self.reply_topic
        if self.auth is not None:
            m["auth"] = self.auth
        return m

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)


MAX_CONTAINERS = 2_048  # maps and lists in one message (an access list of 1,000 addresses needs ~2,000)


def unpack_map(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """msgpack bytes -> a map with string keys, or SchemaError (never another exception)."""
    if type(raw) is not bytes:
        raise SchemaError(Code.MALFORMED, "message value is missing")
    if len(raw) > max_bytes:
        raise SchemaError(Code.TOO_LARGE, f"message is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        budget = MAX_CONTAINERS
        if len(raw) <= budget:  # every map or list takes at least one byte: this one cannot exceed the budget
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        else:
            hook = ContainerBudget(budget)
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, object_hook=hook, list_hook=hook)
    except OverBudget:
        raise SchemaError(Code.TOO_LARGE, f"message holds more than {MAX_CONTAINERS} maps and lists") from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as exc:
        raise SchemaError(Code.MALFORMED, f"not a single valid msgpack object ({type(exc).__name__})") from None
    except RecursionError:
        raise SchemaError(Code.MALFORMED, "msgpack nesting too deep") from None
    if type(obj) is not dict:
        raise SchemaError(Code.NOT_A_MAP, "message must be a msgpack map")
    return obj


def decode_sign_request(raw: bytes) -> SignRequest:
    """Decode and validate one SignRequest; raise SchemaError with a code on any violation."""
    return sign_request_from_map(unpack_map(raw, MAX_REQUEST_BYTES))


def readable_ids(raw: Any) -> tuple[str | None, str | None, str | None]:
    """(request_id, key_id, reply_topic) of a message that may be invalid, as far as they can be read
    (each None unless it has its valid form): where a refusal of that message can be answered."""
    try:
        m = unpack_map(raw, MAX_REQUEST_BYTES)
    except SchemaError:
        return None, None, None
    rid, kid, topic = m.get("request_id"), m.get("key_id"), m.get("reply_topic")
    return (
        rid if type(rid) is str and 0 < len(rid) <= 128 else None,
        kid if type(kid) is str and 0 < len(kid) <= 128 else None,
        topic if type(topic) is str and _TOPIC.match(topic) else None,
    )


def decode_envelope(raw: bytes) -> SignRequest:
    """What a host reads of a SignRequest: every field checked but the payload's shape for its
    scheme (the enclave checks that, and parses it, anyway); `parsed` is None."""
    return sign_request_from_map(unpack_map(raw, MAX_REQUEST_BYTES), _host_only_skip_payload=True)


def sign_request_from_map(m: dict[str, Any], *, _host_only_skip_payload: bool = False) -> SignRequest:
    """A validated SignRequest from a decoded map (the enclave's path: every field and the payload).
    `_host_only_skip_payload` is for decode_envelope alone; nothing in enclave_worker passes it
    (a test keeps it so)."""
    check_payload = not _host_only_skip_payload
    get = m.get
    rid, key_id, scheme, payload = get("request_id"), get("key_id"), get("scheme"), get("payload")
    if (  # the common, valid case, checked inline (a refusal takes the path below, which names the problem)
        type(rid) is str and 0 < len(rid) <= 128 and type(key_id) is str and 0 < len(key_id) <= 128
        and get("v") == VERSION and type(get("v")) is int and type(scheme) is str and scheme in _SCHEME_SET
        and payload is not None and get("deadline_ms") is None and get("reply_topic") is None
        and type(get("auth", {})) is dict
    ):  # fmt: skip
        if scheme == "secp256k1_digest":  # the payload check of the commonest scheme, inline too
            if not check_payload or (type(payload) is bytes and len(payload) == 32):
                return SignRequest(rid, key_id, scheme, payload, None, None, get("auth"))
        elif not check_payload:
            return SignRequest(rid, key_id, scheme, payload, None, None, get("auth"))
        else:
            parsed = validate_payload(scheme, payload, rid)
            return SignRequest(rid, key_id, scheme, payload, None, None, get("auth"), parsed=parsed)
    return _sign_request_checked(m, check_payload)


def _sign_request_checked(m: dict[str, Any], check_payload: bool) -> SignRequest:
    """Every field, in order, each refusal naming its field."""
    rid_raw = m.get("request_id")
    rid = rid_raw if type(rid_raw) is str and 0 < len(rid_raw) <= 128 else None
    v = as_int(require(m, "v", rid), "v", rid)
    if v != VERSION:
        raise SchemaError(Code.UNSUPPORTED_VERSION, f"version {v} is not supported (expected 1)", rid)
    request_id = as_str(require(m, "request_id"), "request_id", max_len=128)
    key_id = as_str(require(m, "key_id", rid), "key_id", rid, max_len=128)
    scheme = require(m, "scheme", rid)
    if type(scheme) is not str:
        raise SchemaError(Code.WRONG_TYPE, "'scheme' must be a string", rid)
    if scheme not in SCHEMES:
        raise SchemaError(Code.UNKNOWN_SCHEME, f"scheme '{scheme[:40]}' is not one of {SCHEMES}", rid)
    payload = require(m, "payload", rid)
    parsed = validate_payload(scheme, payload, rid) if check_payload else None
    deadline = m.get("deadline_ms")
    if deadline is not None:
        deadline = as_int(deadline, "deadline_ms", rid)
        if deadline < 0:
            raise SchemaError(Code.INVALID_VALUE, "'deadline_ms' must be a unix epoch in ms", rid)
    reply_topic = m.get("reply_topic")
    if reply_topic is not None:
        reply_topic = as_str(reply_topic, "reply_topic", rid, max_len=249)
        if not _TOPIC.match(reply_topic):
            raise SchemaError(Code.INVALID_VALUE, "'reply_topic' is not a valid Kafka topic name", rid)
    auth = m.get("auth")
    if auth is not None and type(auth) is not dict:
        raise SchemaError(Code.WRONG_TYPE, "'auth' must be a map", rid)
    return SignRequest(request_id, key_id, scheme, payload, deadline, reply_topic, auth, parsed=parsed)


def validate_payload(scheme: str, payload: Any, rid: str | None) -> Any:
    """Check the payload's shape for its scheme; return its parsed form where there is one
    (an EthTx for eth_tx), else None. The payload itself is passed on unchanged."""
    if scheme == "secp256k1_digest":
        digest = as_bytes(payload, "payload", rid, max_len=32)
        if len(digest) != 32:
            raise SchemaError(Code.INVALID_PAYLOAD, "secp256k1_digest payload must be 32 bytes", rid)
    elif scheme in ("eth_personal", "ed25519"):
        as_bytes(payload, "payload", rid, max_len=MAX_MESSAGE_BYTES)
    elif scheme == "eth_tx":
        return parse_eth_tx(payload, rid)
    elif scheme == "eth_typed_data":
        if type(payload) is not dict or not {"types", "primaryType", "domain", "message"} <= set(payload):
            raise SchemaError(
                Code.INVALID_PAYLOAD,
                "eth_typed_data payload must be a map with types, primaryType, domain, message",
                rid,
            )
    return None


def _sorted(obj: Any) -> Any:
    if type(obj) is dict:
        return {k: _sorted(obj[k]) for k in sorted(obj, key=lambda k: (str(type(k)), k))}
    if type(obj) is list:
        return [_sorted(x) for x in obj]
    return obj


def canonical_encoding(req: SignRequest | dict[str, Any], ts_ms: int, nonce: bytes) -> bytes:
    """The bytes a client signs for a request's `auth` (schemas/README.md, request authentication):
    msgpack of ["signer-auth/v1", request_id, key_id, scheme, payload, deadline_ms, reply_topic, ts_ms,
    nonce] with every map's keys sorted. The enclave verifies against these bytes; a client (or the
    gateway, for an identity it signs for) passes the request as a map."""
    m = req.to_wire() if isinstance(req, SignRequest) else req
    body = ["signer-auth/v1", m["request_id"], m["key_id"], m["scheme"], m["payload"],
            m.get("deadline_ms"), m.get("reply_topic"), ts_ms, nonce]  # fmt: skip
    return bytes(msgpack.packb(_sorted(body), use_bin_type=True))
