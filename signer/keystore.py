"""Where the host keeps wrapped keyrings: useless without an attested enclave, so a plain
directory is fine; the KeyStore interface lets an object store follow.

Layout of DirectoryKeyStore:
    ROOT/<keyring_id>/envelope.v<N>.msgpack       the keyring's KMS-encrypted data key, version N
    ROOT/<keyring_id>/keys/<key_id>.v<N>.msgpack  a wallet key sealed under version N
Envelopes are created exclusively (two writers cannot both create version N);
every write is atomic (temp file, fsync, rename).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

import msgpack

from schemas.names import valid_name
from schemas.records import KeyringEnvelope, SealedKey

_ENVELOPE = re.compile(r"^envelope\.v(\d+)\.msgpack$")
_KEY = re.compile(r"^(k_[0-9a-f]+)\.v(\d+)\.msgpack$")


class KeyringConflict(Exception):
    """Another writer created this keyring version first."""


class KeyStore(Protocol):
    def put_envelope(self, env: KeyringEnvelope) -> None: ...
    def put_key(self, key: SealedKey) -> None: ...
    def refresh(self) -> None: ...
    def envelopes(self) -> list[KeyringEnvelope]: ...
    def keys(self) -> list[SealedKey]: ...
    def get_key(self, key_id: str) -> SealedKey | None: ...
    def get_envelope(self, keyring_id: str) -> KeyringEnvelope | None: ...


class DirectoryKeyStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._envelopes: dict[str, KeyringEnvelope] = {}  # current version per keyring
        self._keys: dict[str, SealedKey] = {}  # current-version sealed key per key id
        self.refresh()

    def refresh(self) -> None:
        """Re-read the directory (other hosts may have written to it)."""
        envelopes: dict[str, KeyringEnvelope] = {}
        keys: dict[str, SealedKey] = {}
        for ring_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and valid_name(p.name)):
            versions = [(int(m[1]), p) for p in ring_dir.iterdir() if (m := _ENVELOPE.match(p.name))]
            if not versions:
                continue
            version, path = max(versions)
            envelopes[ring_dir.name] = KeyringEnvelope.from_wire(_read(path))
            key_dir = ring_dir / "keys"
            if key_dir.is_dir():
                for p in key_dir.iterdir():
                    m = _KEY.match(p.name)
                    if m and int(m[2]) == version:
                        keys[m[1]] = SealedKey.from_wire(_read(p))
        self._envelopes, self._keys = envelopes, keys

    def put_envelope(self, env: KeyringEnvelope) -> None:
        if not valid_name(env.keyring_id):
            raise ValueError(f"bad keyring id {env.keyring_id!r}")
        ring_dir = self.root / env.keyring_id
        (ring_dir / "keys").mkdir(parents=True, exist_ok=True)
        try:
            _write(ring_dir / f"envelope.v{env.dek_version}.msgpack", env.to_wire(), exclusive=True)
        except FileExistsError:
            raise KeyringConflict(f"keyring {env.keyring_id} version {env.dek_version} already exists") from None
        current = self._envelopes.get(env.keyring_id)
        if current is None or env.dek_version > current.dek_version:
            self._envelopes[env.keyring_id] = env
            self._keys = {k: v for k, v in self._keys.items() if v.keyring_id != env.keyring_id}

    def put_key(self, key: SealedKey) -> None:
        if not valid_name(key.keyring_id) or not re.fullmatch(r"k_[0-9a-f]+", key.key_id):
            raise ValueError("bad keyring or key id")
        path = self.root / key.keyring_id / "keys" / f"{key.key_id}.v{key.dek_version}.msgpack"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, key.to_wire(), exclusive=False)
        env = self._envelopes.get(key.keyring_id)
        if env is not None and key.dek_version == env.dek_version:
            self._keys[key.key_id] = key

    def envelopes(self) -> list[KeyringEnvelope]:
        return list(self._envelopes.values())

    def keys(self) -> list[SealedKey]:
        return list(self._keys.values())

    def get_key(self, key_id: str) -> SealedKey | None:
        return self._keys.get(key_id)

    def get_envelope(self, keyring_id: str) -> KeyringEnvelope | None:
        return self._envelopes.get(keyring_id)


def _read(path: Path) -> dict[str, object]:
    return dict(msgpack.unpackb(path.read_bytes(), raw=False))


def _write(path: Path, record: dict[str, object], exclusive: bool) -> None:
    data = msgpack.packb(record, use_bin_type=True)
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
