"""Request authentication inside the enclave: a registered client signs its request.

The client signs the *canonical encoding* of the request: msgpack of
["signer-auth/v1", request_id, key_id, scheme, payload, deadline_ms, reply_topic,
ts_ms, nonce] with every map's keys sorted (recursively), so any msgpack library
can reproduce it. `auth` = {"client_id", "ts_ms", "nonce" (8-32 bytes), "sig"}:
ed25519 signs the encoding itself; secp256k1 signs SHA-256 of it (ECDSA, DER).

Freshness: ts_ms within the window of the enclave's clock. Replay: a nonce seen
before within the window with a *different* request is refused; the *same*
request again (a redelivery after a crash) gets the result it got the first time,
so a request never has two different results.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas.refusals import Code, Refused
from schemas.sign_request import SignRequest, canonical_encoding

from .policy import KeyPolicy

DEFAULT_WINDOW_S = 300.0


@dataclass
class _Seen:
    request_digest: bytes
    expires: float
    result: dict[str, Any] | None = None


class ReplayCache:
    """Bounded: nonces are remembered for the freshness window, at most `capacity` of them."""

    def __init__(self, capacity: int = 100_000, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.capacity, self.window_s = max(1, capacity), window_s
        self._seen: OrderedDict[tuple[str, bytes], _Seen] = OrderedDict()

    def _evict(self, now: float) -> None:
        while self._seen:
            first = next(iter(self._seen.values()))
            if first.expires > now and len(self._seen) <= self.capacity:
                break
            self._seen.popitem(last=False)

    def check(self, client_id: str, nonce: bytes, digest: bytes) -> _Seen | None:
        """The earlier sighting of this nonce for the same request (a redelivery), None if new;
        raises Refused (auth_replayed) if the nonce was used for a different request."""
        now = time.monotonic()
        self._evict(now)
        seen = self._seen.get((client_id, nonce))
        if seen is None:
            self._seen[(client_id, nonce)] = _Seen(digest, now + self.window_s)
            while len(self._seen) > self.capacity:  # at most `capacity`, the new one included: the oldest go
                self._seen.popitem(last=False)
            return None
        if seen.request_digest != digest:
            raise Refused(Code.AUTH_REPLAYED, "this nonce was already used for another request")
        return seen

    def __len__(self) -> int:
        return len(self._seen)


class Authenticator:
    def __init__(self, window_s: float = DEFAULT_WINDOW_S, replay_capacity: int = 100_000) -> None:
        self.window_s = window_s
        self.replays = ReplayCache(replay_capacity, window_s)

    def verify(self, req: SignRequest, policy: KeyPolicy | None) -> _Seen | None:
        """Check a request's auth against the key's policy; raise Refused (an ``auth_*`` code).

        Returns the replay-cache entry when the request carried auth (so the caller can
        record the result for a redelivery), or the earlier entry if this is one."""
        auth = req.auth
        if auth is None:
            if policy is not None and policy.require_auth:
                raise Refused(Code.AUTH_REQUIRED, "this key only signs authenticated requests")
            return None
        if policy is None or not policy.clients:
            raise Refused(Code.AUTH_UNKNOWN_CLIENT, "this key has no registered clients")
        cid, ts, nonce, sig = auth.get("client_id"), auth.get("ts_ms"), auth.get("nonce"), auth.get("sig")
        if type(cid) is not str or type(ts) is not int or type(nonce) is not bytes or type(sig) is not bytes:
            raise Refused(Code.AUTH_MALFORMED, "auth needs client_id (str), ts_ms (int), nonce and sig (bytes)")
        if not 8 <= len(nonce) <= 32:
            raise Refused(Code.AUTH_MALFORMED, "the nonce must be 8-32 bytes")
        client = policy.clients.get(cid)
        if client is None:
            raise Refused(Code.AUTH_UNKNOWN_CLIENT, f"client {cid[:64]!r} is not registered for this key")
        if abs(time.time() * 1000 - ts) > self.window_s * 1000:
            raise Refused(Code.AUTH_STALE, f"ts_ms is outside the {self.window_s:.0f}s freshness window")
        message = canonical_encoding(req, ts, nonce)
        if not _signature_ok(client.scheme, client.public_key, message, sig):
            raise Refused(Code.AUTH_BAD_SIGNATURE, "the request signature does not verify")
        digest = hashlib.sha256(message).digest()
        earlier = self.replays.check(cid, nonce, digest)
        return earlier if earlier is not None else self.replays._seen[(cid, nonce)]


def _signature_ok(scheme: str, public_key: bytes, message: bytes, sig: bytes) -> bool:
    if scheme == "ed25519":
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(sig, message)
            return True
        except (InvalidSignature, ValueError):
            return False
    # ECDSA over SHA-256, DER; OpenSSL (not libsecp256k1, which insists on low-s) so that any
    # standard client library's signatures verify
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public_key)
        key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
