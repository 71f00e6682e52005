"""The refusal catalogue: every code the cluster can refuse with, and the one exception that carries it.

Each ``Code`` is a ``str`` (its wire value, compared and encoded as that string) with:

- ``status``: the SignResult status it gives (``rejected``, ``error`` or ``expired``), or None
  for a code that never reaches a SignResult (key management and frame codes);
- ``surfaces``: where it appears (see ``Surface``);
- ``meaning``: the sentence schemas/README.md documents it with (a unit test keeps the
  README's code tables equal to this catalogue).

Wire values are part of the public contract: a code is added, never renamed or repurposed.

Every layer raises ``Refused(code, message)`` (or one of its thin subclasses) with a member
of ``Code``; nothing outside this module spells a code as a string.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from .names import NAME_RULE


class Surface(StrEnum):
    RESULT = "result"  # a SignResult's error.code (sign.results or the request's reply_topic)
    DLQ = "dlq"  # a DLQ record's reason (sign.dlq)
    ADMIN = "admin"  # a key management reply's error.code (sign.admin.replies, and the enclave's key_op_result)
    FRAME = "frame"  # an `error` frame between host and enclave, before the connection closes (internal)
    CLIENT = "client"  # reported by the `signer keys` CLI itself, never sent by the cluster


REJECTED, ERROR, EXPIRED = "rejected", "error", "expired"
RESULT_STATUSES = (REJECTED, ERROR, EXPIRED)

_R, _D, _A, _F, _C = Surface.RESULT, Surface.DLQ, Surface.ADMIN, Surface.FRAME, Surface.CLIENT
_POLICY = "[Key policies](#key-policies)"
_LIMITS = "[limits above](#signrequest)"


class Code(StrEnum):
    """The catalogue. Member NAME = VALUE.upper(); each entry: (wire value, status, surfaces, meaning)."""

    status: str | None
    surfaces: frozenset[Surface]
    meaning: str

    def __new__(cls, value: str, status: str | None, surfaces: tuple[Surface, ...], meaning: str) -> Code:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.surfaces = frozenset(surfaces)
        member.meaning = meaning
        return member

    # -- sign results -----------------------------------------------------------------------------
    DEADLINE_PASSED = (
        "deadline_passed", EXPIRED, (_R, _A),
        "`deadline_ms` passed before signing (checked at intake, in the enclave, and while the keyring was being "
        "unwrapped); for a key operation, its keyring's unwrap outlasted the enclave's unwrap timeout",
    )  # fmt: skip
    UNKNOWN_KEY = ("unknown_key", ERROR, (_R,), "no such `key_id` in the key store")
    UNKNOWN_KEYRING = (
        "unknown_keyring", ERROR, (_R, _A),
        "no such keyring: `keys.rotate_dek` names one that was never created, or a key's keyring is not loaded in "
        "the enclave",
    )  # fmt: skip
    KMS_ACCESS_DENIED = (
        "kms_access_denied", ERROR, (_R, _A),
        "KMS refused the keyring's data key to this enclave image (policy / attestation)",
    )  # fmt: skip
    KMS_THROTTLED = ("kms_throttled", ERROR, (_R, _A), "KMS kept throttling until the unwrap deadline")
    KMS_UNAVAILABLE = ("kms_unavailable", ERROR, (_R, _A), "KMS could not be reached before the unwrap deadline")
    KMS_ERROR = ("kms_error", ERROR, (_R, _A), "KMS answered with another error (the message names it)")
    KMS_KEY_NOT_ALLOWED = (
        "kms_key_not_allowed", ERROR, (_R, _A),
        "the keyring is under a KMS key the enclave's configuration does not name",
    )  # fmt: skip
    KMS_PROTOCOL = (
        "kms_protocol", ERROR, (_R, _A),
        "a KMS answer that is not what was asked (e.g. for another KeyId, or a data key that does not open)",
    )  # fmt: skip
    SCHEME_MISMATCH = (
        "scheme_mismatch", REJECTED, (_R,),
        "the key's type cannot sign this scheme (e.g. an ed25519 key asked for `eth_tx`)",
    )  # fmt: skip
    SENDER_MISMATCH = ("sender_mismatch", REJECTED, (_R,), "`eth_tx` `from` is not the key's address")
    POLICY_SCHEME = (
        "policy_scheme", REJECTED, (_R,),
        f"the key's policy does not sign this scheme: its `schemes` do not name it, or (without `schemes`) a limit "
        f"it sets cannot be checked on it (see {_POLICY})",
    )  # fmt: skip
    POLICY_CHAIN_ID = (
        "policy_chain_id", REJECTED, (_R,),
        "the `eth_tx` `chainId`, or the EIP-712 domain's `chainId`, is not in `chain_ids`; typed data whose domain "
        "has no `chainId` declared `uint256` with an integer value is refused the same way",
    )  # fmt: skip
    POLICY_DESTINATION = (
        "policy_destination", REJECTED, (_R,),
        "the `eth_tx` destination is not on `to_allowlist` (or is a contract creation)",
    )  # fmt: skip
    POLICY_VALUE_CAP = ("policy_value_cap", REJECTED, (_R,), "the `eth_tx` value exceeds `max_value`")
    POLICY_VERIFYING_CONTRACT = (
        "policy_verifying_contract", REJECTED, (_R,),
        "the EIP-712 domain's `verifyingContract` is not on `typed_data_contracts`, or is absent, not declared "
        "`address`, or not a 20-byte address",
    )  # fmt: skip
    AUTH_REQUIRED = (
        "auth_required", REJECTED, (_R,),
        "the key's policy sets `require_auth` and the request carries no `auth`",
    )  # fmt: skip
    AUTH_BAD_SIGNATURE = (
        "auth_bad_signature", REJECTED, (_R,),
        "the request signature does not verify with the client's registered key",
    )  # fmt: skip
    AUTH_STALE = ("auth_stale", REJECTED, (_R,), "`ts_ms` is outside the enclave's freshness window")
    AUTH_REPLAYED = ("auth_replayed", REJECTED, (_R,), "the nonce was already used for a different request")
    AUTH_UNKNOWN_CLIENT = (
        "auth_unknown_client", REJECTED, (_R,),
        "the `client_id` is not registered in the key's policy (or the key registers no clients)",
    )  # fmt: skip
    AUTH_MALFORMED = (
        "auth_malformed", REJECTED, (_R,),
        "the `auth` map lacks a field or has one of the wrong type, or its nonce is not 8-32 bytes",
    )  # fmt: skip
    TYPED_DATA_TOO_DEEP = (
        "typed_data_too_deep", REJECTED, (_R,), f"EIP-712 input nested beyond the {_LIMITS}",
    )  # fmt: skip
    TYPED_DATA_TOO_LARGE = (
        "typed_data_too_large", REJECTED, (_R,),
        f"EIP-712 input beyond any other of the {_LIMITS}, or over the cost budget",
    )  # fmt: skip
    INVALID_TYPED_DATA = (
        "invalid_typed_data", ERROR, (_R,),
        "the EIP-712 document is not valid (missing fields, unknown types, malformed names or array types, "
        "duplicate fields, undeclared domain keys, values that do not fit)",
    )  # fmt: skip
    SEALED_KEY_INVALID = (
        "sealed_key_invalid", ERROR, (_R, _A),
        "the key's sealed record does not open (tampered, e.g. a changed policy); `keys.rotate_dek` refuses a "
        "keyring holding such a key",
    )  # fmt: skip
    INVALID_POLICY = (
        "invalid_policy", ERROR, (_R, _A),
        f"a key policy is not accepted: at creation or import, a malformed one (see {_POLICY}); at signing, a "
        "sealed policy this enclave version does not accept (it fails closed)",
    )  # fmt: skip
    KEY_UNSTABLE = (
        "key_unstable", ERROR, (_R,), "the key's record kept being replaced while its keyring was unwrapped",
    )  # fmt: skip
    UNSUPPORTED_SCHEME = (
        "unsupported_scheme", ERROR, (_R,),
        "the scheme is valid on the wire but not implemented by this enclave version",
    )  # fmt: skip
    INTERNAL = ("internal", ERROR, (_R, _A), "a bug; the message names the exception type, never key material")

    # -- DLQ reasons (also result codes: the enclave re-validates every request) ------------------
    MALFORMED = (
        "malformed", ERROR, (_R, _D), "not a single valid msgpack object (or invalid UTF-8, trailing bytes)",
    )  # fmt: skip
    TOO_LARGE = (
        "too_large", ERROR, (_R, _D),
        "above the 256 KiB message limit, or more than 2,048 maps and lists in one message",
    )  # fmt: skip
    NOT_A_MAP = ("not_a_map", ERROR, (_R, _D), "msgpack, but not a map")
    UNSUPPORTED_VERSION = ("unsupported_version", ERROR, (_R, _D), "`v` is not 1")
    MISSING_FIELD = ("missing_field", ERROR, (_R, _D), "a required field is absent")
    WRONG_TYPE = (
        "wrong_type", ERROR, (_R, _D),
        "a field has the wrong msgpack type (e.g. `true` for an int, str for bytes)",
    )  # fmt: skip
    INVALID_VALUE = (
        "invalid_value", ERROR, (_R, _D), "right type, invalid value (length, range, topic name, keyring name)",
    )  # fmt: skip
    UNKNOWN_SCHEME = ("unknown_scheme", ERROR, (_R, _D), "`scheme` is not one of the five")
    INVALID_PAYLOAD = (
        "invalid_payload", ERROR, (_R, _D),
        "the payload does not fit its scheme (e.g. a 31-byte digest, an `eth_tx` without `chainId`)",
    )  # fmt: skip
    POISON_REQUEST = (
        "poison_request", ERROR, (_R, _D),
        "a valid request refused by the host: enclave connections were lost (crashed, hung) while it was in flight "
        "on them `SIGNER_POISON_ATTEMPTS` times (default 3, the last ones with the request sent alone); it is not "
        "retried, its result is `error` / `poison_request`, and its original bytes go to `sign.dlq` with this reason",
    )  # fmt: skip

    # -- key management ------------------------------------------------------------------------------
    OPERATION_UNSIGNED = (
        "operation_unsigned", None, (_A,),
        "the operation bytes or the approvals are missing, or an approval is not `{operator, sig}`",
    )  # fmt: skip
    OPERATION_BAD_SIGNATURE = (
        "operation_bad_signature", None, (_A,), "a configured operator's approval does not verify",
    )  # fmt: skip
    OPERATION_QUORUM = (
        "operation_quorum", None, (_A,), "too few valid approvals from distinct configured operators",
    )  # fmt: skip
    OPERATION_MISMATCH = (
        "operation_mismatch", None, (_A,), "the operation was signed for another op, or another `encrypted_key`",
    )  # fmt: skip
    OPERATION_WRONG_ENCLAVE = (
        "operation_wrong_enclave", None, (_A,),
        "the operation was signed for another enclave process (identity key)",
    )  # fmt: skip
    OPERATION_EXPIRED = ("operation_expired", None, (_A,), "the operation's `expires_ms` has passed")
    OPERATION_TOO_LONG = ("operation_too_long", None, (_A,), "`expires_ms` is more than 15 minutes ahead")
    OPERATION_REPLAYED = ("operation_replayed", None, (_A,), "this signed operation (its nonce) was already used")
    OPERATION_BUSY = (
        "operation_busy", None, (_A,), "too many unexpired operations are remembered; retry in a few minutes",
    )  # fmt: skip
    INVALID_ARGUMENT = (
        "invalid_argument", None, (_A,),
        f"an argument is missing or malformed (e.g. a keyring name that is not {NAME_RULE}, an unknown key scheme, "
        "an `encrypted_key` that is not 256 bytes, an operation that is not msgpack)",
    )  # fmt: skip
    INVALID_RECORD = (
        "invalid_record", None, (_A,), "a keyring or key record the host loaded into the enclave is not well-formed",
    )  # fmt: skip
    IMPORT_UNDECRYPTABLE = (
        "import_undecryptable", None, (_A,),
        "the imported key is not encrypted to this enclave's import key for this keyring, scheme and policy",
    )  # fmt: skip
    KEYRING_CONFLICT = ("keyring_conflict", None, (_A,), "another host created this keyring version first; retry")
    ENCLAVE_UNAVAILABLE = (
        "enclave_unavailable", None, (_A,),
        "no enclave connection could carry the operation (none is up, or not the `enclave_id` asked for), or it "
        "was lost during the operation",
    )  # fmt: skip
    TOO_MANY_KEYS = (
        "too_many_keys", None, (_A,),
        "loading the host's records would exceed the enclave's maximum of keyring versions (10,000), or a rotation "
        "would reseal fewer keys than the host's store holds for the keyring (the enclave holds at most "
        "`ENCLAVE_MAX_KEYS` / `ENCLAVE_MAX_KEY_BYTES` at once)",
    )  # fmt: skip
    UNKNOWN_OP = ("unknown_op", None, (_A,), "the operation is not one the host or the enclave knows")
    UNSUPPORTED = ("unsupported", None, (_A,), "the enclave worker has no key vault (it runs the benchmark handler)")
    TIMEOUT = (
        "timeout", None, (_C,),
        "reported by `signer keys` itself, never sent: no reply on `sign.admin.replies` within its timeout",
    )  # fmt: skip

    # -- host <-> enclave frames (internal) ------------------------------------------------------
    FRAME_TOO_LARGE = (
        "frame_too_large", None, (_F,),
        "a frame above the receiver's size limit (an enclave accepts at most 2 MiB from its host)",
    )  # fmt: skip
    FRAME_TOO_COMPLEX = ("frame_too_complex", None, (_F,), "a host frame holding more than 50,000 maps and lists")
    CORRUPT_FRAME = (
        "corrupt_frame", None, (_F,),
        "a body that is not msgpack, not a map with a type `t`, or a frame whose fields do not have their types "
        "and bounds (e.g. a `sign` frame whose items are not `[[int, bytes], ...]`)",
    )  # fmt: skip
    CREDITS_EXCEEDED = (
        "credits_exceeded", None, (_F,), "the host sent more requests than the credits the enclave granted",
    )  # fmt: skip
    DEFERRED_BYTES_EXCEEDED = (
        "deferred_bytes_exceeded", None, (_F,),
        "more than 32 MiB of one connection's requests waiting for keyring unwraps",
    )  # fmt: skip
    TOO_MANY_KEY_OPS = ("too_many_key_ops", None, (_F,), "more than 8 key operations in flight on one connection")
    UNKNOWN_FRAME = (
        "unknown_frame", None, (_F,),
        "an unknown frame type, or one the receiver does not take (e.g. `results` sent to an enclave)",
    )  # fmt: skip

    @classmethod
    def lookup(cls, value: Any) -> Code | None:
        """The catalogue entry for a wire value, None if there is none."""
        return _BY_VALUE.get(value) if type(value) is str else None

    @classmethod
    def on(cls, surface: Surface) -> tuple[Code, ...]:
        """The codes that appear on one surface, in catalogue order."""
        return tuple(c for c in cls if surface in c.surfaces)


_BY_VALUE: dict[str, Code] = {c.value: c for c in Code}


def _check_catalogue() -> None:
    for code in Code:
        assert code.name == code.value.upper(), code
        assert code.surfaces, code
        assert (code.status is not None) == (Surface.RESULT in code.surfaces), code
        assert code.status is None or code.status in RESULT_STATUSES, code
        assert (Surface.DLQ not in code.surfaces) or (Surface.RESULT in code.surfaces), code


_check_catalogue()


class Refused(Exception):
    """The one refusal: a catalogue ``code`` and a human ``message``.

    ``status`` (the SignResult status) comes from the catalogue, never from the raiser. Layers
    may subclass it to name where a refusal comes from (SchemaError, PolicyViolation, ...), never
    to add codes."""

    def __init__(self, code: Code, message: str) -> None:
        if not isinstance(code, Code):
            raise TypeError(f"a refusal code must be a schemas.refusals.Code, not {code!r}")
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    @property
    def status(self) -> str | None:
        return self.code.status

    def to_wire(self, max_message: int | None = 300) -> dict[str, str]:
        """The `error` map of a key management reply (message clipped to ``max_message``, None: whole)."""
        return {"code": self.code.value, "message": self.message[:max_message]}

    @classmethod
    def from_wire(cls, error: Any) -> Refused:
        """A refusal relayed from a peer's `error` map. A code outside the catalogue (a peer of
        another version, a malformed reply) is not passed on: it becomes ``internal``."""
        error = error if type(error) is dict else {}
        message = str(error.get("message", ""))
        code = Code.lookup(error.get("code"))
        if code is None:
            return cls(Code.INTERNAL, f"unrecognised refusal {str(error.get('code'))[:40]!r}: {message}")
        return cls(code, message)
