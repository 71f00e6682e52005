"""Where the hosts keep wrapped keyrings and sealed keys, chosen by one URL (SIGNER_KEYSTORE).

    dir:///PATH                 a directory (development, or hosts that share one)    DirectoryKeyStore
    kafka://  kafka:///TOPIC    a compacted topic on the cluster's Kafka (sign.keys)   keystore_kafka.py
    s3://BUCKET/PREFIX          S3 objects, envelopes created with If-None-Match: *    keystore_aws.py
    dynamodb://TABLE            DynamoDB items, created with attribute_not_exists     keystore_aws.py

The store is untrusted storage: every record is authenticated by its AEAD inside the enclave
before anything in it is believed. What the store guarantees is availability and one rule every
host computes the same way (`KeyView`): a keyring's version is created once - the first envelope
stored for it wins and a second creator gets KeyringConflict - and a keyring's current keys are
the sealed keys of its highest version sealed under that version's winning data key. A record
that does not decode is skipped (logged as `keystore_record_invalid`, counted in `invalid`),
never loaded, and never stops the rest of the store from loading.

Layout of DirectoryKeyStore:
    ROOT/<keyring_id>/envelope.v<N>.msgpack             the keyring's KMS-encrypted data key, version N
    ROOT/<keyring_id>/keys/<key_id>.v<N>.<tag>.msgpack  a wallet key sealed under the data key `tag`
                                                        (`dek_tag`); a name without a tag (written
                                                        before tags) counts as version N's winner's
Envelopes are created exclusively (two writers cannot both create version N);
every write is atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import msgpack
import structlog

from schemas.names import valid_name
from schemas.records import KeyringEnvelope, SealedKey

log = structlog.get_logger("keystore")

_ENVELOPE = re.compile(r"^envelope\.v(\d+)\.msgpack$")
_KEY = re.compile(r"^(k_[0-9a-f]+)\.v(\d+)(?:\.([0-9a-f]{16}))?\.msgpack$")
KEY_ID = re.compile(r"k_[0-9a-f]+")
DEFAULT_KEYS_TOPIC = "sign.keys"


class KeyringConflict(Exception):
    """Another writer created this keyring version first."""


class KeyStoreError(Exception):
    """The store cannot be reached or used (not a refusal of one record)."""


class KeyStore(Protocol):
    """One interface for every backend. start() builds the view (reading the whole store); the
    getters answer from it without I/O; refresh() reads what other writers stored since."""

    url: str
    invalid: int

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def refresh(self) -> None: ...
    async def put_envelope(self, env: KeyringEnvelope) -> None:
        """Store a new keyring version exclusively: KeyringConflict if another envelope holds it
        (the same envelope again is no conflict)."""
        ...

    async def put_keys(self, envelope: KeyringEnvelope, keys: list[SealedKey]) -> None:
        """Store keys sealed under `envelope`'s data key (rotation stores them before the envelope)."""
        ...

    def envelopes(self) -> list[KeyringEnvelope]: ...
    def keys(self) -> list[SealedKey]: ...
    def get_key(self, key_id: str) -> SealedKey | None: ...
    def get_envelope(self, keyring_id: str) -> KeyringEnvelope | None: ...
    def envelope_version(self, keyring_id: str, version: int) -> KeyringEnvelope | None: ...


def dek_tag(env: KeyringEnvelope) -> str:
    """Names one data key: two creators of one keyring version hold different data keys, so their
    records get different tags (and, in Kafka, different record keys that compaction keeps apart)."""
    return hashlib.sha256(env.encrypted_dek).hexdigest()[:16]


class KeyView:
    """The current records, whatever the backend stores them in.

    Per keyring and version the first envelope added wins (`add_envelope` returns the winner, so a
    writer learns whether it won); the keyring's current envelope is its highest version's winner.
    A sealed key belongs to the keyring version and data key (`dek_tag`) it was sealed under; tag ""
    (the directory layout, which names none) matches that version's winner, whichever it is. Keys
    of versions below the current one are dropped."""

    def __init__(self) -> None:
        self._versions: dict[str, dict[int, KeyringEnvelope]] = {}
        self._current: dict[str, tuple[KeyringEnvelope, str]] = {}  # keyring -> (envelope, its tag)
        self._sealed: dict[tuple[str, int, str], dict[str, SealedKey]] = {}
        self._ring_of: dict[str, str] = {}

    def add_envelope(self, env: KeyringEnvelope) -> KeyringEnvelope:
        versions = self._versions.setdefault(env.keyring_id, {})
        winner = versions.setdefault(env.dek_version, env)
        if winner is env:
            current = self._current.get(env.keyring_id)
            if current is None or env.dek_version > current[0].dek_version:
                self._current[env.keyring_id] = (env, dek_tag(env))
                for slot in [s for s in self._sealed if s[0] == env.keyring_id and s[1] < env.dek_version]:
                    del self._sealed[slot]
        return winner

    def add_key(self, key: SealedKey, tag: str = "") -> None:
        current = self._current.get(key.keyring_id)
        if current is not None and key.dek_version < current[0].dek_version:
            return  # sealed under a version the keyring has moved past
        self._sealed.setdefault((key.keyring_id, key.dek_version, tag), {})[key.key_id] = key
        self._ring_of[key.key_id] = key.keyring_id

    def envelope_version(self, keyring_id: str, version: int) -> KeyringEnvelope | None:
        return self._versions.get(keyring_id, {}).get(version)

    def has_key(self, key: SealedKey, tag: str = "") -> bool:
        return self._sealed.get((key.keyring_id, key.dek_version, tag), {}).get(key.key_id) == key

    def get_envelope(self, keyring_id: str) -> KeyringEnvelope | None:
        current = self._current.get(keyring_id)
        return current[0] if current is not None else None

    def get_key(self, key_id: str) -> SealedKey | None:
        ring = self._ring_of.get(key_id)
        current = self._current.get(ring) if ring is not None else None
        if current is None:
            return None
        env, tag = current
        slot = (env.keyring_id, env.dek_version)
        found = self._sealed.get((*slot, tag), {}).get(key_id)
        return found if found is not None else self._sealed.get((*slot, ""), {}).get(key_id)

    def envelopes(self) -> list[KeyringEnvelope]:
        return [env for env, _ in self._current.values()]

    def keys(self) -> list[SealedKey]:
        out: list[SealedKey] = []
        for env, tag in self._current.values():
            slot = (env.keyring_id, env.dek_version)
            members = {**self._sealed.get((*slot, ""), {}), **self._sealed.get((*slot, tag), {})}
            out.extend(members.values())
        return out


class ViewedKeyStore:
    """The getters every backend shares: answers from its KeyView, no I/O."""

    url = ""

    def __init__(self) -> None:
        self.view = KeyView()
        self.invalid = 0  # records skipped because they did not decode

    def envelopes(self) -> list[KeyringEnvelope]:
        return self.view.envelopes()

    def keys(self) -> list[SealedKey]:
        return self.view.keys()

    def get_key(self, key_id: str) -> SealedKey | None:
        return self.view.get_key(key_id)

    def get_envelope(self, keyring_id: str) -> KeyringEnvelope | None:
        return self.view.get_envelope(keyring_id)

    def envelope_version(self, keyring_id: str, version: int) -> KeyringEnvelope | None:
        return self.view.envelope_version(keyring_id, version)

    def skipped(self, where: str, exc: BaseException) -> None:
        """A record that does not decode: never loaded, counted, logged once per read."""
        self.invalid += 1
        log.warning("keystore_record_invalid", store=self.url, record=where[:200], error=repr(exc)[:200])


# -- records as stored ------------------------------------------------------------------------------


def encode(record: KeyringEnvelope | SealedKey) -> bytes:
    return bytes(msgpack.packb(record.to_wire(), use_bin_type=True))


def decode_envelope(data: bytes) -> KeyringEnvelope:
    return KeyringEnvelope.from_wire(msgpack.unpackb(data, raw=False))


def decode_key(data: bytes) -> SealedKey:
    return SealedKey.from_wire(msgpack.unpackb(data, raw=False))


# garbled bytes raise msgpack's errors (ValueError subclasses), RecordError (a ValueError) or TypeError
UNDECODABLE = (ValueError, TypeError, KeyError)


def stored_envelope(data: bytes, keyring_id: str, version: int | str) -> KeyringEnvelope:
    """An envelope read from its place in a store (file, object, item, record key), which names its
    keyring and version: a record that names others is not loaded (one of UNDECODABLE)."""
    env = decode_envelope(data)
    if (env.keyring_id, str(env.dek_version)) != (keyring_id, str(version)):
        raise ValueError("the record names another keyring or version than its place in the store")
    return env


def stored_key(data: bytes, keyring_id: str, version: int | str, key_id: str) -> SealedKey:
    """A sealed key read from its place in a store, which names its keyring, version and key id."""
    key = decode_key(data)
    if (key.keyring_id, str(key.dek_version), key.key_id) != (keyring_id, str(version), key_id):
        raise ValueError("the record names another keyring, version or key than its place in the store")
    return key


def check_ids(env: KeyringEnvelope | None = None, keys: list[SealedKey] | None = None) -> None:
    if env is not None and not valid_name(env.keyring_id):
        raise ValueError(f"bad keyring id {env.keyring_id!r}")
    for key in keys or []:
        if not valid_name(key.keyring_id) or not KEY_ID.fullmatch(key.key_id):
            raise ValueError("bad keyring or key id")
        if env is not None and (key.keyring_id, key.dek_version) != (env.keyring_id, env.dek_version):
            raise ValueError(f"key {key.key_id} is not sealed under {env.keyring_id} version {env.dek_version}")


# -- the directory backend --------------------------------------------------------------------------


class DirectoryKeyStore(ViewedKeyStore):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.url = f"dir://{root}"

    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        await self.refresh()

    async def close(self) -> None:
        pass

    async def refresh(self) -> None:
        """Re-read the directory (other hosts may have written to it)."""
        self.view = await asyncio.to_thread(self._scan)

    def _scan(self) -> KeyView:
        view = KeyView()
        if not self.root.is_dir():
            return view
        for ring_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and valid_name(p.name)):
            for version, path in sorted((int(m[1]), p) for p in ring_dir.iterdir() if (m := _ENVELOPE.match(p.name))):
                try:
                    env = stored_envelope(path.read_bytes(), ring_dir.name, version)
                except (*UNDECODABLE, OSError) as exc:
                    self.skipped(str(path), exc)
                    continue
                view.add_envelope(env)
            key_dir = ring_dir / "keys"
            if key_dir.is_dir():
                for p in sorted(key_dir.iterdir()):
                    if not (m := _KEY.match(p.name)):
                        continue
                    try:
                        key = stored_key(p.read_bytes(), ring_dir.name, int(m[2]), m[1])
                    except (*UNDECODABLE, OSError) as exc:
                        self.skipped(str(p), exc)
                        continue
                    view.add_key(key, m[3] or "")
        return view

    async def put_envelope(self, env: KeyringEnvelope) -> None:
        check_ids(env)
        await asyncio.to_thread(self._put_envelope, env)
        self.view.add_envelope(env)

    def _put_envelope(self, env: KeyringEnvelope) -> None:
        ring_dir = self.root / env.keyring_id
        (ring_dir / "keys").mkdir(parents=True, exist_ok=True)
        path = ring_dir / f"envelope.v{env.dek_version}.msgpack"
        data = encode(env)
        try:
            _write(path, data, exclusive=True)
        except FileExistsError:
            if path.read_bytes() != data:  # the same record again (a copy, a retry) is no conflict
                raise KeyringConflict(f"keyring {env.keyring_id} version {env.dek_version} already exists") from None

    async def put_keys(self, envelope: KeyringEnvelope, keys: list[SealedKey]) -> None:
        check_ids(envelope, keys)
        tag = dek_tag(envelope)
        await asyncio.to_thread(self._put_keys, keys, tag)
        for key in keys:
            self.view.add_key(key, tag)

    def _put_keys(self, keys: list[SealedKey], tag: str) -> None:
        for key in keys:
            path = self.root / key.keyring_id / "keys" / f"{key.key_id}.v{key.dek_version}.{tag}.msgpack"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, encode(key), exclusive=False)


def _write(path: Path, data: bytes, exclusive: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if the name exists: create-exclusive, atomically
        else:
            os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- choosing a backend -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreURL:
    """A parsed SIGNER_KEYSTORE: the backend (`scheme`) and where in it."""

    scheme: str  # dir | kafka | s3 | dynamodb
    location: str  # the directory, topic, bucket or table
    prefix: str = ""  # s3 only: the key prefix inside the bucket
    options: dict[str, str] = field(default_factory=dict)  # s3/dynamodb: region, endpoint


_SCHEMES = ("dir", "kafka", "s3", "dynamodb")
_AWS_OPTIONS = frozenset({"region", "endpoint"})


def parse_url(url: str) -> StoreURL:
    """The key store a URL names; ValueError says what is wrong with it (the caller names the setting)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"not a key store URL (expected {', '.join(s + '://' for s in _SCHEMES)})")
    if parts.fragment:
        raise ValueError("a key store URL has no #fragment")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    if scheme == "dir":
        if parts.netloc or options:
            raise ValueError("dir:// takes an absolute path and nothing else: dir:///var/lib/signer/keystore")
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise ValueError("dir:// needs an absolute directory path: dir:///var/lib/signer/keystore")
        return StoreURL("dir", path)
    if scheme == "kafka":
        if parts.netloc or options:
            raise ValueError("kafka:// takes the cluster's own Kafka (KAFKA_BOOTSTRAP) and at most a topic name: "
                             "kafka:// or kafka:///TOPIC")  # fmt: skip
        topic = unquote(parts.path).strip("/") or DEFAULT_KEYS_TOPIC
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", topic) or topic in (".", ".."):
            raise ValueError(f"{topic!r} is not a Kafka topic name")
        return StoreURL("kafka", topic)
    unknown = set(options) - _AWS_OPTIONS
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} (known: region, endpoint)")
    if not parts.netloc:
        what = "bucket" if scheme == "s3" else "table"
        raise ValueError(f"{scheme}:// needs a {what}: {scheme}://{what.upper()}{'/PREFIX' if scheme == 's3' else ''}")
    if scheme == "s3":
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parts.netloc):
            raise ValueError(f"{parts.netloc!r} is not an S3 bucket name")
        return StoreURL("s3", parts.netloc, unquote(parts.path).strip("/"), options)
    if parts.path.strip("/"):
        raise ValueError("dynamodb:// names a table and nothing after it: dynamodb://TABLE")
    if not re.fullmatch(r"[A-Za-z0-9._-]{3,255}", parts.netloc):
        raise ValueError(f"{parts.netloc!r} is not a DynamoDB table name")
    return StoreURL("dynamodb", parts.netloc, "", options)


def open_keystore(url: str, *, bootstrap: str = "", **kafka: Any) -> KeyStore:
    """The store a URL names, not started yet (`await store.start()`). `bootstrap` is the cluster's Kafka,
    for kafka://; `kafka` are KafkaKeyStore options (tests shorten segments with them)."""
    where = parse_url(url)
    if where.scheme == "dir":
        return DirectoryKeyStore(Path(where.location))
    if where.scheme == "kafka":
        from .keystore_kafka import KafkaKeyStore

        if not bootstrap:
            raise ValueError("kafka:// needs the cluster's Kafka: KAFKA_BOOTSTRAP is not set")
        return KafkaKeyStore(bootstrap, where.location, **kafka)
    from .keystore_aws import DynamoDBKeyStore, S3KeyStore

    region, endpoint = where.options.get("region"), where.options.get("endpoint")
    if where.scheme == "s3":
        return S3KeyStore(where.location, where.prefix, region=region, endpoint=endpoint)
    return DynamoDBKeyStore(where.location, region=region, endpoint=endpoint)


def read_keys(url: str) -> list[SealedKey]:
    """The current keys of the store at `url`, read once (for a reader that holds no store of its own:
    the gateway's public key directory). Blocking: call it from a worker thread. A dir:// store that
    does not exist yet has no keys; kafka:// takes KAFKA_BOOTSTRAP as the hosts do."""
    if not url:
        return []

    async def snapshot() -> list[SealedKey]:
        bootstrap = ""
        if parse_url(url).scheme == "kafka":
            from .config import HostConfig

            bootstrap = HostConfig.from_env().bootstrap
        store = open_keystore(url, bootstrap=bootstrap, writer=False) if bootstrap else open_keystore(url)
        if isinstance(store, DirectoryKeyStore):  # read only: no directory is created
            await store.refresh()
            return store.keys()
        await store.start()
        try:
            return store.keys()
        finally:
            await store.close()

    return asyncio.run(snapshot())
