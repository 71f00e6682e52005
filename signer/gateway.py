"""The HTTP gateway: `python -m signer gateway`.

A stateless aiohttp service in front of the Kafka path. Each call becomes one SignRequest on the
request topic (with this instance's reply topic and a deadline), and is answered with the
SignResult that comes back on that topic, matched by request_id. The enclave's policy and
authentication checks, the hosts' delivery guarantees, backpressure and metrics all apply
unchanged: the gateway is one more producer.

- Native API: `POST /v1/sign` (JSON in the wire contract's shape with bytes as 0x-hex, or the
  msgpack SignRequest itself), `GET /v1/keys`, `GET /v1/info`.
- The Web3Signer-compatible eth1 surface (JSON-RPC on `/`, `POST /api/v1/eth1/sign/{identifier}`,
  `GET /upcheck`, `GET /healthcheck`): signer/gateway_eth1.py.

Callers authenticate with a bearer token or a TLS client certificate, each mapped to a client
identity in SIGNER_GATEWAY_CLIENTS; see docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.clients import result_producer
from broker.topics import TopicLayout, replication_factor_for, topic_configs
from schemas.errors import SchemaError
from schemas.keccak import keccak256, to_checksum_address
from schemas.refusals import Code
from schemas.sign_request import MAX_REQUEST_BYTES, canonical_encoding, sign_request_from_map

from .config import ConfigError, HostConfig, _bool, _env, _int

if TYPE_CHECKING:
    from .keystore import KeyStore

log = structlog.get_logger("gateway")

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
_U64 = 2**64 - 1
_I64_MIN = -(2**63)


class GatewayCode(StrEnum):
    """Errors the gateway itself answers with (bad input uses the contract's codes instead)."""

    UNAUTHORIZED = "unauthorized"  # 401: no or unknown credentials
    FORBIDDEN = "forbidden"  # 403: the client may not use this key
    OVERLOADED = "overloaded"  # 429: the gateway's bound on outstanding calls is reached
    GATEWAY_TIMEOUT = "gateway_timeout"  # 504: no result before the call's deadline
    UNAVAILABLE = "unavailable"  # 503: Kafka did not accept the request, or the gateway is stopping
    NOT_FOUND = "not_found"  # 404
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # 415
    CONFLICT = "conflict"  # 409: the request_id is in flight with another request
    BODY_TIMEOUT = "body_timeout"  # 408: the body did not arrive in time
    GATEWAY_ERROR = "gateway_error"  # 500: a bug in the gateway


TIMEOUT_MESSAGE = (
    "no result before the deadline; the request was accepted by Kafka and may still be answered on the reply "
    "topic (the enclave never signs past deadline_ms). Retry with the same request_id to get its result"
)


class GatewayError(Exception):
    def __init__(
        self, http_status: int, code: str, message: str, request_id: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.http_status, self.code, self.message = http_status, str(code), message
        self.request_id, self.retry_after = request_id, retry_after


def error_body(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": str(code), "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


# -- configuration ----------------------------------------------------------------------------------


@dataclass
class GatewayConfig:
    bootstrap: str
    layout: TopicLayout = field(default_factory=TopicLayout)
    keystore_dir: str = ""
    host: str = "127.0.0.1"
    port: int = 9000
    instance_id: str = ""  # "" -> a random one (its reply topic is deleted on a clean stop)
    reply_partitions: int = 1
    max_outstanding: int = 2048
    timeout_ms: int = 10_000
    max_timeout_ms: int = 60_000
    expiry_grace_ms: int = 1_000
    max_body_bytes: int = 1024 * 1024
    body_timeout_ms: int = 10_000
    clients_file: str = ""
    allow_unauthenticated: bool = False
    metrics_public: bool = False
    chain_id: int | None = None
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    keys_refresh_s: int = 5
    drain_s: int = 15
    max_batch: int = 100  # JSON-RPC calls in one batch

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> GatewayConfig:
        env = dict(os.environ if environ is None else environ)
        host = HostConfig.from_env(env)  # Kafka, topic names and the key store, as the hosts read them

        def num(name: str, default: int, minimum: int = 0) -> int:
            return _int(name, default, minimum, env)

        chain = _env("SIGNER_GATEWAY_CHAIN_ID", "", env).strip()
        try:
            chain_id = int(chain, 0) if chain else None
        except ValueError:
            raise ConfigError(f"SIGNER_GATEWAY_CHAIN_ID={chain!r} is not an integer") from None
        cfg = cls(
            bootstrap=host.bootstrap,
            layout=host.layout,
            keystore_dir=host.keystore_dir,
            host=_env("SIGNER_GATEWAY_HOST", "127.0.0.1", env),
            port=num("SIGNER_GATEWAY_PORT", 9000),
            instance_id=_env("SIGNER_GATEWAY_ID", "", env),
            reply_partitions=num("SIGNER_GATEWAY_REPLY_PARTITIONS", 1, 1),
            max_outstanding=num("SIGNER_GATEWAY_MAX_OUTSTANDING", 2048, 1),
            timeout_ms=num("SIGNER_GATEWAY_TIMEOUT_MS", 10_000, 10),
            max_timeout_ms=num("SIGNER_GATEWAY_MAX_TIMEOUT_MS", 60_000, 10),
            expiry_grace_ms=num("SIGNER_GATEWAY_EXPIRY_GRACE_MS", 1_000),
            max_body_bytes=num("SIGNER_GATEWAY_MAX_BODY_BYTES", 1024 * 1024, 1024),
            body_timeout_ms=num("SIGNER_GATEWAY_BODY_TIMEOUT_MS", 10_000, 10),
            clients_file=_env("SIGNER_GATEWAY_CLIENTS", "", env),
            allow_unauthenticated=_bool("SIGNER_GATEWAY_ALLOW_UNAUTHENTICATED", False, env),
            metrics_public=_bool("SIGNER_GATEWAY_METRICS_PUBLIC", False, env),
            chain_id=chain_id,
            tls_cert=_env("SIGNER_GATEWAY_TLS_CERT", "", env),
            tls_key=_env("SIGNER_GATEWAY_TLS_KEY", "", env),
            tls_client_ca=_env("SIGNER_GATEWAY_TLS_CLIENT_CA", "", env),
            keys_refresh_s=num("SIGNER_GATEWAY_KEYS_REFRESH_S", 5, 1),
            drain_s=num("SIGNER_GATEWAY_DRAIN_S", 15),
        )
        if cfg.instance_id and not all(c.isalnum() or c in "-_" for c in cfg.instance_id):
            raise ConfigError(f"SIGNER_GATEWAY_ID={cfg.instance_id!r}: letters, digits, '-' and '_' only")
        if cfg.timeout_ms > cfg.max_timeout_ms:
            raise ConfigError("SIGNER_GATEWAY_TIMEOUT_MS must be <= SIGNER_GATEWAY_MAX_TIMEOUT_MS")
        if bool(cfg.tls_cert) != bool(cfg.tls_key):
            raise ConfigError("SIGNER_GATEWAY_TLS_CERT and SIGNER_GATEWAY_TLS_KEY go together")
        if cfg.tls_client_ca and not cfg.tls_cert:
            raise ConfigError("SIGNER_GATEWAY_TLS_CLIENT_CA (mTLS) needs SIGNER_GATEWAY_TLS_CERT/KEY")
        return cfg

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_client_ca:
            ctx.load_verify_locations(self.tls_client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL  # a certificate when given must verify; tokens still work
        return ctx


# -- clients ----------------------------------------------------------------------------------------


@dataclass
class Client:
    """A caller identity: what it may use, and (optionally) the key the gateway signs `auth` with
    for it, so that key policies registering this client id accept its requests."""

    client_id: str
    keys: frozenset[str] | None = None  # key ids and lower-case 0x addresses; None: every key
    auth_signer: Callable[[bytes], bytes] | None = None

    def may_use(self, key_id: str, address: str | None) -> bool:
        if self.keys is None:
            return True
        return key_id in self.keys or (address is not None and address.lower() in self.keys)


ANONYMOUS = Client("anonymous")


def _auth_signer(path: str) -> Callable[[bytes], bytes]:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if isinstance(key, Ed25519PrivateKey):
        return key.sign
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256K1):
        return lambda data: key.sign(data, ec.ECDSA(hashes.SHA256()))
    raise ConfigError(f"{path}: an auth key is an ed25519 or secp256k1 private key (PEM)")


class Clients:
    """SIGNER_GATEWAY_CLIENTS: a JSON file {client_id: {"token_sha256": hex, "tls_cn": name,
    "keys": [key ids or addresses], "auth_key": PEM path}}. Tokens are kept as SHA-256 only."""

    def __init__(self, entries: dict[str, Any] | None = None, allow_unauthenticated: bool = False) -> None:
        self.by_token: dict[bytes, Client] = {}
        self.by_cn: dict[str, Client] = {}
        self.allow_unauthenticated = allow_unauthenticated
        for client_id, spec in (entries or {}).items():
            if not isinstance(spec, dict):
                raise ConfigError(f"SIGNER_GATEWAY_CLIENTS: {client_id}: an object is expected")
            unknown = set(spec) - {"token_sha256", "tls_cn", "keys", "auth_key"}
            if unknown:
                raise ConfigError(f"SIGNER_GATEWAY_CLIENTS: {client_id}: unknown fields {sorted(unknown)}")
            keys = spec.get("keys")
            client = Client(
                client_id,
                frozenset(str(k).lower() if str(k).startswith("0x") else str(k) for k in keys)
                if keys is not None
                else None,
                _auth_signer(spec["auth_key"]) if spec.get("auth_key") else None,
            )
            if spec.get("token_sha256"):
                try:
                    digest = bytes.fromhex(str(spec["token_sha256"]))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise ConfigError(f"SIGNER_GATEWAY_CLIENTS: {client_id}: token_sha256 must be 64 hex digits")
                self.by_token[digest] = client
            if spec.get("tls_cn"):
                self.by_cn[str(spec["tls_cn"])] = client

    @classmethod
    def load(cls, path: str, allow_unauthenticated: bool) -> Clients:
        if not path:
            return cls(None, allow_unauthenticated)
        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"SIGNER_GATEWAY_CLIENTS={path}: {exc}") from None
        if not isinstance(entries, dict):
            raise ConfigError(f"SIGNER_GATEWAY_CLIENTS={path}: a JSON object of clients is expected")
        return cls(entries, allow_unauthenticated)

    def identify(self, request: web.Request) -> Client:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise GatewayError(401, GatewayCode.UNAUTHORIZED, "Authorization must be 'Bearer TOKEN'")
            digest = hashlib.sha256(token.strip().encode()).digest()
            for known, client in self.by_token.items():  # constant time per entry
                if hmac.compare_digest(known, digest):
                    return client
            raise GatewayError(401, GatewayCode.UNAUTHORIZED, "unknown bearer token")
        cert = request.transport.get_extra_info("peercert") if request.transport is not None else None
        if cert:
            for rdn in cert.get("subject", ()):
                for name, value in rdn:
                    if name == "commonName" and value in self.by_cn:
                        return self.by_cn[value]
            raise GatewayError(401, GatewayCode.UNAUTHORIZED, "the client certificate names no known client")
        if self.allow_unauthenticated:
            return ANONYMOUS
        raise GatewayError(401, GatewayCode.UNAUTHORIZED, "authentication required (Authorization: Bearer TOKEN)")


# -- the key directory (public information only) ----------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    scheme: str
    public_key: bytes
    address: str | None
    keyring: str

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key_id": self.key_id,
            "scheme": self.scheme,
            "public_key": "0x" + self.public_key.hex(),
            "keyring": self.keyring,
        }
        if self.address:
            out["address"] = self.address
        return out


def _address(scheme: str, public_key: bytes) -> str | None:
    if scheme != "secp256k1" or len(public_key) != 65:
        return None
    return to_checksum_address(keccak256(public_key[1:])[-20:])


class KeyDirectory:
    """key_id, address and public key of the keys in the key store the hosts use (no secret is read;
    the sealed parts stay where they are). A directory store is re-read when its directories change;
    any other store is opened once (for reading) and brought up to date (`KeyStore.refresh`: for Kafka,
    read to the end offset; for S3, new objects only). Either is checked every
    SIGNER_GATEWAY_KEYS_REFRESH_S, and before listing keys or on an unknown identifier (at most every
    0.1 s). Addresses are derived from the public keys. A wrong mapping cannot make the gateway return
    a signature by another address than the one asked for: transactions carry `from` (checked in the
    enclave), and eth_sign and eth1 sign signatures are recovered and compared before they are returned."""

    def __init__(self, root: str, refresh_s: float, bootstrap: str = "") -> None:
        self.root, self.refresh_s, self.bootstrap = root, refresh_s, bootstrap
        self._store: KeyStore | None = None  # a store that is not a directory, once opened
        self.by_id: dict[str, KeyInfo] = {}
        self.by_ident: dict[str, KeyInfo] = {}  # lower 0x address, 0x public key (65 and 64 bytes)
        self.loaded = False
        self._last = 0.0
        self._seen: tuple[tuple[str, int], ...] = ()
        self._lock = asyncio.Lock()

    def _read(self) -> list[KeyInfo]:
        from .keystore import read_keys

        # root: a directory (dir:// stores) or the key store's URL; a snapshot of its current keys
        keys = read_keys(self.root if "://" in self.root else f"dir://{self.root}" if self.root else "")
        # the address is derived here from the public key (which the sealed record binds), not read
        return [KeyInfo(k.key_id, k.scheme, k.public_key, _address(k.scheme, k.public_key), k.keyring_id)
                for k in keys]  # fmt: skip

    async def _read_store(self) -> list[KeyInfo]:
        """The live store's current keys: opened (for reading) the first time, then refreshed. A store that
        fails to refresh - or a Kafka topic that did not exist when it was opened - is opened again."""
        from .keystore import KeyStoreError, open_keystore

        if self._store is not None:
            try:
                await self._store.refresh()
            except KeyStoreError:
                await self.close()
        if self._store is None:
            if self.root.startswith("kafka:"):  # for reading only: no producer, no topic created
                store = open_keystore(self.root, bootstrap=self.bootstrap, writer=False)
            else:
                store = open_keystore(self.root)
            await store.start()
            self._store = store
        return [KeyInfo(k.key_id, k.scheme, k.public_key, _address(k.scheme, k.public_key), k.keyring_id)
                for k in self._store.keys()]  # fmt: skip

    async def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            await store.close()

    def _stamp(self) -> tuple[tuple[str, int], ...]:
        """Modification times of the store's directories: a key written anywhere changes one."""
        root = Path(self.root)
        if not self.root or not root.is_dir():
            return ()
        dirs = [root, *(p for ring in root.iterdir() if ring.is_dir() for p in (ring, ring / "keys") if p.is_dir())]
        return tuple((str(p), p.stat().st_mtime_ns) for p in dirs)

    async def refresh(self, force: bool = False) -> None:
        """Re-read the store if it changed (checked at most every 0.1 s unless forced)."""
        async with self._lock:
            now = time.monotonic()
            if not force and now - self._last < 0.1:
                return
            self._last = now
            try:
                stamp: tuple[tuple[str, int], ...] = ()
                if "://" in self.root:  # a store that is not a directory
                    keys = await self._read_store()
                else:
                    stamp = await asyncio.to_thread(self._stamp)
                    if stamp == self._seen and self.loaded and not force:
                        return
                    keys = await asyncio.to_thread(self._read)
            except Exception as exc:  # a half-written store: keep what we had
                log.warning("keys_refresh_failed", error=repr(exc))
                return
            self._seen = stamp
            by_ident: dict[str, KeyInfo] = {}
            for k in keys:
                if k.address:
                    by_ident[k.address.lower()] = k
                by_ident["0x" + k.public_key.hex()] = k
                if len(k.public_key) == 65:
                    by_ident["0x" + k.public_key[1:].hex()] = k
            self.by_id, self.by_ident, self.loaded = {k.key_id: k for k in keys}, by_ident, True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh(force=True)

    async def find(self, identifier: str) -> KeyInfo | None:
        """A key by address or public key (0x-hex, any case) or key id."""
        ident = identifier.strip()
        norm = ident.lower() if ident[:2].lower() == "0x" else "0x" + ident.lower()
        key = self.by_id.get(ident) or self.by_ident.get(norm)
        if key is None:
            await self.refresh()
            key = self.by_id.get(ident) or self.by_ident.get(norm)
        return key


# -- metrics ----------------------------------------------------------------------------------------

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "signer_gateway_requests",
            "HTTP calls answered, by route and outcome (a result status or an error code)",
            ["route", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "signer_gateway_request_seconds",
            "Time from a call's arrival to its answer",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.outstanding = Gauge(
            "signer_gateway_outstanding", "Calls in progress (bounded by SIGNER_GATEWAY_MAX_OUTSTANDING)", registry=r
        )
        self.errors = Counter(
            "signer_gateway_errors",
            "Calls answered with an error, by code (the result's or the gateway's)",
            ["code"],
            registry=r,
        )
        self.late_results = Counter(
            "signer_gateway_late_results",
            "Results that arrived for no waiting call (after its timeout, or from before a restart)",
            registry=r,
        )
        self.kafka_send_seconds = Histogram(
            "signer_gateway_kafka_send_seconds",
            "Producing one request until Kafka acknowledged it",
            buckets=_BUCKETS,
            registry=r,
        )


# -- the core: requests out, results back ------------------------------------------------------------


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    client_id: str
    digest: bytes


class Gateway:
    def __init__(self, cfg: GatewayConfig, clients: Clients | None = None) -> None:
        self.cfg = cfg
        self.generated_id = not cfg.instance_id
        self.instance_id = cfg.instance_id or uuid.uuid4().hex[:12]
        self.reply_topic = f"{cfg.layout.results}.gw.{self.instance_id}"
        self.clients = clients or Clients.load(cfg.clients_file, cfg.allow_unauthenticated)
        self.keys = KeyDirectory(cfg.keystore_dir, cfg.keys_refresh_s, cfg.bootstrap)
        self.metrics = GatewayMetrics()
        self.pending: dict[str, _Pending] = {}
        self.calls = 0  # calls in progress (admitted), bounded by max_outstanding
        self.stopping = False
        self.kafka_ready = False
        self._producer: Any = None
        self._consumer: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        await self._create_reply_topic()
        self._producer = result_producer(
            self.cfg.bootstrap, client_id=f"signer-gateway-{self.instance_id}", linger_ms=0
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.cfg.bootstrap,
            client_id=f"signer-gateway-{self.instance_id}",
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=1024 * 1024,
        )
        await self._consumer.start()
        parts = [TopicPartition(self.reply_topic, p) for p in range(self.cfg.reply_partitions)]
        self._consumer.assign(parts)
        await self._consumer.seek_to_end(*parts)
        for tp in parts:  # positioned before the first request is sent: no reply can be missed
            await self._consumer.position(tp)
        await self.keys.refresh(force=True)
        self._tasks = [
            asyncio.create_task(self._read_results(), name="gateway-results"),
            asyncio.create_task(self.keys.run(), name="gateway-keys"),
        ]
        self.kafka_ready = True

    async def _create_reply_topic(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import TopicAlreadyExistsError

        admin = AIOKafkaAdminClient(bootstrap_servers=self.cfg.bootstrap, client_id="signer-gateway")
        await admin.start()
        try:
            if self.reply_topic not in set(await admin.list_topics()):
                rf = self.cfg.layout.replication_factor or replication_factor_for(
                    len((await admin.describe_cluster())["brokers"])
                )
                # results are only useful for a call's lifetime: an hour of retention bounds the topic
                configs = {**topic_configs(rf), "retention.ms": "3600000"}
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(
                        [NewTopic(self.reply_topic, self.cfg.reply_partitions, rf, topic_configs=configs)]
                    )
            async with asyncio.timeout(30):
                while True:
                    described = await admin.describe_topics([self.reply_topic])
                    if all(
                        t.get("error_code", 0) == 0
                        and t["partitions"]
                        and all(p["leader"] >= 0 for p in t["partitions"])
                        for t in described
                    ):
                        break
                    await asyncio.sleep(0.1)
        finally:
            await admin.close()

    async def _delete_reply_topic(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.cfg.bootstrap, client_id="signer-gateway")
        try:
            await admin.start()
            await admin.delete_topics([self.reply_topic])
        except Exception as exc:
            log.warning("reply_topic_not_deleted", topic=self.reply_topic, error=repr(exc))
        finally:
            await admin.close()

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting calls; wait (bounded) for those in progress to be answered."""
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.calls:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)

    def fail_pending(self) -> None:
        """Answer every waiting call with 503 (the gateway is stopping): none is left hanging."""
        self.stopping = True
        for rid, p in self.pending.items():
            if not p.future.done():
                p.future.set_exception(
                    GatewayError(
                        503,
                        GatewayCode.UNAVAILABLE,
                        "the gateway stopped before the result came; retry with the same request_id",
                        rid,
                    )
                )
        self.pending.clear()

    async def close(self) -> None:
        self.stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.fail_pending()
        await self.keys.close()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self.generated_id:
            await self._delete_reply_topic()

    async def _read_results(self) -> None:
        consumer = self._consumer
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=1000)
            for records in batch.values():
                for rec in records:
                    try:
                        result = msgpack.unpackb(rec.value, raw=False)
                        rid = result.get("request_id")
                    except Exception:
                        continue
                    entry = self.pending.pop(rid, None) if type(rid) is str else None
                    if entry is None or entry.future.done():
                        self.metrics.late_results.inc()
                        continue
                    entry.future.set_result(result)

    # -- one call -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def admitted(self) -> Any:
        """A call in progress; past SIGNER_GATEWAY_MAX_OUTSTANDING (or while stopping) it is refused."""
        if self.stopping:
            raise GatewayError(503, GatewayCode.UNAVAILABLE, "the gateway is stopping", retry_after=1)
        if self.calls >= self.cfg.max_outstanding:
            raise GatewayError(
                429,
                GatewayCode.OVERLOADED,
                f"{self.calls} calls in progress (SIGNER_GATEWAY_MAX_OUTSTANDING)",
                retry_after=1,
            )
        self.calls += 1
        self.metrics.outstanding.set(self.calls)
        try:
            yield
        finally:
            self.calls -= 1
            self.metrics.outstanding.set(self.calls)

    def deadline(self, request: web.Request, body_deadline: Any) -> tuple[int, bool]:
        """(deadline_ms for the request, whether the caller set it): the body's `deadline_ms`, else the
        `Signer-Deadline-Ms` (unix ms) or `Signer-Timeout-Ms` header, else SIGNER_GATEWAY_TIMEOUT_MS;
        never beyond SIGNER_GATEWAY_MAX_TIMEOUT_MS from now."""
        now = int(time.time() * 1000)
        cap = now + self.cfg.max_timeout_ms
        if body_deadline is not None:
            if type(body_deadline) is not int:
                raise GatewayError(400, Code.WRONG_TYPE, "'deadline_ms' must be an integer (unix epoch ms)")
            return body_deadline, True
        header = request.headers.get("Signer-Deadline-Ms")
        relative = request.headers.get("Signer-Timeout-Ms")
        try:
            if header is not None:
                return min(int(header), cap), True
            if relative is not None:
                ms = int(relative)
                if ms <= 0:
                    raise ValueError
                return min(now + ms, cap), True
        except ValueError:
            raise GatewayError(
                400, Code.INVALID_VALUE, "Signer-Deadline-Ms / Signer-Timeout-Ms must be positive integers (ms)"
            ) from None
        return now + self.cfg.timeout_ms, False

    async def sign(self, m: dict[str, Any], client: Client, deadline_ms: int) -> dict[str, Any]:
        """Send one SignRequest map (request_id, key_id, scheme, payload; auth optional) and return
        its SignResult map. Fills in request_id, reply_topic and deadline_ms; signs `auth` for a
        client the gateway holds an auth key for."""
        rid = m.get("request_id")
        if rid is None:
            rid = m["request_id"] = str(uuid.uuid4())
        m.setdefault("v", 1)
        if m.get("auth") is not None:  # the caller signed it: nothing it covers may change
            if m.get("reply_topic") != self.reply_topic:
                raise GatewayError(
                    400,
                    Code.INVALID_VALUE,
                    f"a request carrying its own 'auth' must name "
                    f"reply_topic {self.reply_topic!r} (GET /v1/info) in what it signs",
                    rid,
                )
        else:
            if m.get("reply_topic") not in (None, self.reply_topic):
                raise GatewayError(400, Code.INVALID_VALUE, "reply_topic is set by the gateway (GET /v1/info)")
            m["reply_topic"] = self.reply_topic
            now = int(time.time() * 1000)
            m["deadline_ms"] = min(deadline_ms, now + self.cfg.max_timeout_ms)
        try:
            sign_request_from_map(m)
        except SchemaError as exc:
            raise GatewayError(400, exc.code, exc.message, rid if type(rid) is str else None) from None
        key = self.keys.by_id.get(m["key_id"])
        if not client.may_use(m["key_id"], key.address if key else None):
            raise GatewayError(403, GatewayCode.FORBIDDEN, f"client {client.client_id!r} may not use this key", rid)
        # what a retry with the same request_id must repeat to share the call in flight
        digest = hashlib.sha256(msgpack.packb([m["key_id"], m["scheme"], m["payload"]], use_bin_type=True)).digest()
        if m.get("auth") is None and client.auth_signer is not None:
            ts_ms, nonce = int(time.time() * 1000), secrets.token_bytes(16)
            sig = client.auth_signer(canonical_encoding(m, ts_ms, nonce))
            m["auth"] = {"client_id": client.client_id, "ts_ms": ts_ms, "nonce": nonce, "sig": sig}
        raw = msgpack.packb(m, use_bin_type=True)
        if len(raw) > MAX_REQUEST_BYTES:
            raise GatewayError(
                413, Code.TOO_LARGE, f"the request is {len(raw)} bytes encoded, the limit is {MAX_REQUEST_BYTES}", rid
            )
        return await self._send(rid, m["key_id"], raw, client, digest, m.get("deadline_ms") or deadline_ms)

    async def _send(
        self, rid: str, key_id: str, raw: bytes, client: Client, digest: bytes, deadline_ms: int
    ) -> dict[str, Any]:
        entry = self.pending.get(rid)
        if entry is not None:  # the same call again (a retry with its Idempotency-Key): wait for the same result
            if entry.client_id != client.client_id or entry.digest != digest:
                raise GatewayError(409, GatewayCode.CONFLICT, "this request_id is in flight with another request", rid)
        else:
            entry = _Pending(asyncio.get_running_loop().create_future(), client.client_id, digest)
            self.pending[rid] = entry
            t0 = time.perf_counter()
            try:
                await self._producer.send_and_wait(self.cfg.layout.requests, raw, key=key_id.encode())
            except Exception as exc:
                self.pending.pop(rid, None)
                if not entry.future.done():
                    entry.future.cancel()
                raise GatewayError(
                    503,
                    GatewayCode.UNAVAILABLE,
                    f"Kafka did not accept the request ({type(exc).__name__}); retrying is safe",
                    retry_after=1,
                ) from None
            self.metrics.kafka_send_seconds.observe(time.perf_counter() - t0)
        wait_s = (deadline_ms + self.cfg.expiry_grace_ms) / 1000 - time.time()
        try:
            async with asyncio.timeout(max(wait_s, 0.001)):
                return await asyncio.shield(entry.future)
        except TimeoutError:
            if self.pending.get(rid) is entry:
                del self.pending[rid]  # its result, if one comes, counts as late
            raise GatewayError(504, GatewayCode.GATEWAY_TIMEOUT, TIMEOUT_MESSAGE, rid) from None


# -- JSON <-> the wire contract ------------------------------------------------------------------------

_BYTES_SCHEMES = ("secp256k1_digest", "eth_personal", "ed25519")


def hex_bytes(value: Any, name: str) -> bytes:
    """A 0x-hex JSON string as bytes (the JSON form of a msgpack bin)."""
    if type(value) is not str or not value.startswith(("0x", "0X")):
        raise GatewayError(400, Code.WRONG_TYPE, f"'{name}' must be a 0x-hex string (bytes)")
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise GatewayError(400, Code.INVALID_VALUE, f"'{name}' is not valid hex (an even number of digits)") from None


def packable(obj: Any, depth: int = 0) -> Any:
    """JSON values as msgpack can carry them: integers beyond 64 bits become strings (0x-hex when
    positive, which `eth_tx` quantities and EIP-712 integers both accept; decimal when negative)."""
    if depth > 64:
        raise GatewayError(400, Code.TOO_LARGE, "JSON nested too deep")
    if type(obj) is int and not _I64_MIN <= obj <= _U64:
        return hex(obj) if obj > 0 else str(obj)
    if type(obj) is dict:
        return {k: packable(v, depth + 1) for k, v in obj.items()}
    if type(obj) is list:
        return [packable(v, depth + 1) for v in obj]
    if type(obj) is float:
        raise GatewayError(400, Code.WRONG_TYPE, "numbers must be integers (no fractions or exponents)")
    return obj


def request_from_json(body: Any) -> dict[str, Any]:
    """A SignRequest map from its JSON form: the contract's fields, bytes as 0x-hex (the payload of
    secp256k1_digest, eth_personal and ed25519; auth.nonce and auth.sig)."""
    if type(body) is not dict:
        raise GatewayError(400, Code.NOT_A_MAP, "the body must be a JSON object (a SignRequest)")
    m = packable(body)
    if m.get("scheme") in _BYTES_SCHEMES and "payload" in m:
        m["payload"] = hex_bytes(m["payload"], "payload")
    auth = m.get("auth")
    if type(auth) is dict:
        for name in ("nonce", "sig"):
            if name in auth:
                auth[name] = hex_bytes(auth[name], f"auth.{name}")
    rid = m.get("request_id")
    if rid is not None and (type(rid) is not str or not 0 < len(rid) <= 128):
        raise GatewayError(400, Code.INVALID_VALUE, "'request_id' must be 1-128 characters")
    return m


def to_json(obj: Any) -> Any:
    if type(obj) is bytes:
        return "0x" + obj.hex()
    if type(obj) is dict:
        return {k: to_json(v) for k, v in obj.items()}
    if type(obj) is list:
        return [to_json(v) for v in obj]
    return obj


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(exc: GatewayError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return json_response(error_body(exc.code, exc.message, exc.request_id), exc.http_status, headers)


async def read_body(gw: Gateway, request: web.Request) -> bytes:
    """The body, within SIGNER_GATEWAY_MAX_BODY_BYTES and SIGNER_GATEWAY_BODY_TIMEOUT_MS."""
    limit = gw.cfg.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise GatewayError(413, Code.TOO_LARGE, f"the body is {request.content_length} bytes, the limit is {limit}")
    try:
        async with asyncio.timeout(gw.cfg.body_timeout_ms / 1000):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise GatewayError(413, Code.TOO_LARGE, f"the body is larger than {limit} bytes") from None
    except TimeoutError:
        raise GatewayError(
            408,
            GatewayCode.BODY_TIMEOUT,
            f"the body did not arrive within {gw.cfg.body_timeout_ms} ms (SIGNER_GATEWAY_BODY_TIMEOUT_MS)",
        ) from None


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise GatewayError(400, Code.MALFORMED, "the body is not valid JSON") from None


def media_type(request: web.Request) -> str:
    """The body's media type: '' when absent (taken as JSON)."""
    if "Content-Type" not in request.headers:
        return ""
    return request.content_type.lower()


def is_json_type(mt: str) -> bool:
    return mt in ("", "application/json") or mt.endswith("+json")


# -- the native API ---------------------------------------------------------------------------------


def native_routes(gw: Gateway) -> list[web.RouteDef]:
    async def sign(request: web.Request) -> web.Response:
        with gw.admitted():
            client = gw.clients.identify(request)
            mt = media_type(request)
            raw = await read_body(gw, request)
            if mt in MSGPACK_TYPES:
                from schemas.sign_request import unpack_map

                try:
                    m = unpack_map(raw, MAX_REQUEST_BYTES)
                except SchemaError as exc:
                    raise GatewayError(400 if exc.code is not Code.TOO_LARGE else 413, exc.code, exc.message) from None
            elif is_json_type(mt):
                m = request_from_json(parse_json(raw))
            else:
                raise GatewayError(
                    415, GatewayCode.UNSUPPORTED_MEDIA_TYPE, f"send application/json or {MSGPACK_TYPES[0]}, not {mt}"
                )
            idem = request.headers.get("Idempotency-Key")
            if idem is not None:
                if m.get("request_id") not in (None, idem):
                    raise GatewayError(400, Code.INVALID_VALUE, "Idempotency-Key and request_id differ")
                if not 0 < len(idem) <= 128:
                    raise GatewayError(400, Code.INVALID_VALUE, "Idempotency-Key must be 1-128 characters")
                m["request_id"] = idem
            deadline_ms, _ = gw.deadline(request, m.get("deadline_ms"))
            result = await gw.sign(m, client, deadline_ms)
            request["outcome"] = result.get("status", "?")
            if result.get("status") != "ok":
                request["error_code"] = str((result.get("error") or {}).get("code", "?"))
            if any(a.strip().lower().startswith(MSGPACK_TYPES) for a in request.headers.get("Accept", "").split(",")):
                return web.Response(body=msgpack.packb(result, use_bin_type=True), content_type=MSGPACK_TYPES[0])
            return json_response(to_json(result))

    async def keys(request: web.Request) -> web.Response:
        client = gw.clients.identify(request)
        await gw.keys.refresh()
        listed = [
            k.public()
            for k in sorted(gw.keys.by_id.values(), key=lambda k: k.key_id)
            if client.may_use(k.key_id, k.address)
        ]
        return json_response({"keys": listed})

    async def info(request: web.Request) -> web.Response:
        gw.clients.identify(request)
        return json_response(
            {
                "instance_id": gw.instance_id,
                "reply_topic": gw.reply_topic,
                "request_topic": gw.cfg.layout.requests,
                "timeout_ms": gw.cfg.timeout_ms,
                "max_timeout_ms": gw.cfg.max_timeout_ms,
                "max_body_bytes": gw.cfg.max_body_bytes,
            }
        )

    async def metrics(request: web.Request) -> web.Response:
        if not gw.cfg.metrics_public:
            gw.clients.identify(request)
        return web.Response(body=generate_latest(gw.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return [
        web.post("/v1/sign", sign),
        web.get("/v1/keys", keys),
        web.get("/v1/info", info),
        web.get("/metrics", metrics),
    ]


def _route_label(request: web.Request) -> str:
    if "route" in request:
        return str(request["route"])
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def make_app(gw: Gateway) -> web.Application:
    from .gateway_eth1 import eth1_routes

    @web.middleware
    async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        t0 = time.perf_counter()
        response: web.StreamResponse
        try:
            response = await handler(request)
        except GatewayError as exc:
            request["outcome"] = request["error_code"] = exc.code
            response = error_response(exc)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, method, oversized body
            code = {404: GatewayCode.NOT_FOUND, 405: GatewayCode.METHOD_NOT_ALLOWED, 413: Code.TOO_LARGE}.get(
                exc.status, GatewayCode.GATEWAY_ERROR if exc.status >= 500 else Code.INVALID_VALUE
            )
            request["outcome"] = request["error_code"] = str(code)
            response = json_response(error_body(code, exc.reason), exc.status)
            if exc.status == 405 and "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            log.exception("gateway_unhandled", path=request.path)
            request["outcome"] = request["error_code"] = str(GatewayCode.GATEWAY_ERROR)
            response = json_response(error_body(GatewayCode.GATEWAY_ERROR, type(exc).__name__), 500)
        route = _route_label(request)
        gw.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        gw.metrics.requests.labels(route, str(request.get("outcome", response.status))).inc()
        if "error_code" in request:
            gw.metrics.errors.labels(str(request["error_code"])).inc()
        return response

    app = web.Application(middlewares=[errors], client_max_size=gw.cfg.max_body_bytes)
    app.add_routes(native_routes(gw))
    app.add_routes(eth1_routes(gw))
    return app


# -- the process ----------------------------------------------------------------------------------


async def run_gateway(stop: asyncio.Event | None = None) -> int:
    """`python -m signer gateway`: serve until SIGINT/SIGTERM; prints `READY http://HOST:PORT`."""
    import signal

    from .http import listen_socket

    cfg = GatewayConfig.from_env()
    if not cfg.bootstrap:
        raise ConfigError("KAFKA_BOOTSTRAP is not set (HOST:PORT of the Kafka cluster)")
    try:
        sock = listen_socket(cfg.host, cfg.port)
    except ConfigError:
        raise ConfigError(
            f"SIGNER_GATEWAY_PORT={cfg.port}: {cfg.host}:{cfg.port} cannot be bound (in use?); "
            "set SIGNER_GATEWAY_PORT to a free port, or 0 for any"
        ) from None
    gw = Gateway(cfg)
    runner: web.AppRunner | None = None
    try:
        await gw.start()
        runner = web.AppRunner(make_app(gw), access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        site = web.SockSite(runner, sock, ssl_context=cfg.ssl_context())
        await site.start()
        port = sock.getsockname()[1]
        scheme = "https" if cfg.tls_cert else "http"
        print(f"READY {scheme}://{cfg.host}:{port}", flush=True)
        log.info("gateway_ready", port=port, reply_topic=gw.reply_topic, instance_id=gw.instance_id)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # a clean stop: refuse new calls (503), answer those in progress within their deadline
        await gw.drain(cfg.drain_s)
    finally:
        gw.fail_pending()  # whatever is still waiting is answered 503, never dropped
        if runner is not None:
            await runner.cleanup()
        else:
            sock.close()
        await gw.close()
    return 0
