"""DataKeyCache: unwrapped keyring data keys inside the enclave, bounded in size, age and uses.

An entry also keeps the wallet keys opened with its DEK, so a hot key costs a
dict lookup; at most ``max_opened`` of them across all entries (least recently
used dropped first: the next request for one opens its sealed record again).
Evicted DEK bytes are overwritten (as far as Python allows: the AESGCM object
and the opened wallet key objects keep their own copies inside
OpenSSL/libsecp256k1 until they are garbage-collected).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


@dataclass
class CachedDataKey:
    material: bytearray
    aead: AESGCM
    expires_at: float
    uses: int = 0
    wallets: dict[str, Any] = field(default_factory=dict)  # key_id -> opened Wallet

    def wipe(self) -> None:
        for i in range(len(self.material)):
            self.material[i] = 0
        self.wallets.clear()


class DataKeyCache:
    def __init__(
        self, max_entries: int = 1024, ttl_s: float = 3600.0, max_uses: int = 10_000_000,
        clock: Callable[[], float] = time.monotonic, max_opened: int = 100_000,
    ) -> None:  # fmt: skip
        self.max_entries, self.ttl_s, self.max_uses = max_entries, ttl_s, max_uses
        self.max_opened = max_opened
        self._clock = clock
        self._entries: OrderedDict[tuple[str, int], CachedDataKey] = OrderedDict()
        # key_id -> the entry holding its opened wallet (a key's wallet is in one entry at most),
        # least recently used first
        self._opened: OrderedDict[str, CachedDataKey] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.opened_evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, keyring_id: str, version: int) -> CachedDataKey | None:
        slot = (keyring_id, version)
        entry = self._entries.get(slot)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires_at <= self._clock() or entry.uses >= self.max_uses:
            self._evict(slot)
            self.misses += 1
            return None
        self._entries.move_to_end(slot)
        self.hits += 1
        return entry

    def put(self, keyring_id: str, version: int, dek: bytes) -> CachedDataKey:
        slot = (keyring_id, version)
        if slot in self._entries:
            self._evict(slot)
        material = bytearray(dek)
        entry = CachedDataKey(material, AESGCM(bytes(material)), self._clock() + self.ttl_s)
        self._entries[slot] = entry
        while len(self._entries) > self.max_entries:
            self._evict(next(iter(self._entries)))
        return entry

    @property
    def opened_count(self) -> int:
        return len(self._opened)

    def opened(self, entry: CachedDataKey, key_id: str) -> Any:
        """The wallet opened for key_id under this entry's data key, if it is kept."""
        wallet = entry.wallets.get(key_id)
        if wallet is not None:
            self._opened.move_to_end(key_id)
        return wallet

    def keep_opened(self, entry: CachedDataKey, key_id: str, wallet: Any) -> None:
        """Keep an opened wallet under its data key; past max_opened, the least recently used goes."""
        previous = self._opened.pop(key_id, None)
        if previous is not None and previous is not entry:
            previous.wallets.pop(key_id, None)
        entry.wallets[key_id] = wallet
        self._opened[key_id] = entry
        while len(self._opened) > self.max_opened:
            old_id, old_entry = self._opened.popitem(last=False)
            old_entry.wallets.pop(old_id, None)
            self.opened_evictions += 1

    def forget_wallet(self, key_id: str) -> None:
        """A key's sealed record changed or was dropped: its wallet must be opened (and checked) again."""
        entry = self._opened.pop(key_id, None)
        if entry is not None:
            entry.wallets.pop(key_id, None)

    def drop(self, keyring_id: str, version: int) -> None:
        if (keyring_id, version) in self._entries:
            self._evict((keyring_id, version))

    def _evict(self, slot: tuple[str, int]) -> None:
        entry = self._entries.pop(slot)
        for key_id in entry.wallets:
            self._opened.pop(key_id, None)
        entry.wipe()
        self.evictions += 1

    def clear(self) -> None:
        for slot in list(self._entries):
            self._evict(slot)
