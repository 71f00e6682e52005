"""The enclaves as the host sees them: the pool of connections and the key store, kept in step.

`EnclaveBackend` owns the key store, the `EnclavePool` and the `KeyManager` that relays admin
operations. It listens to the pool's connect event: a new connection gets the KMS credentials,
every stored keyring envelope and at most `preload_keys` sealed keys (the most recently created)
before it takes work; an enclave's other connections, up while it got them, get no keys again.
Any other key is pushed when it is first asked for: requests are routed by their key's keyring
(so one enclave keeps a keyring's data key hot), and on `unknown_key` - a key this enclave never
got or let go (its key cache is bounded), or one created through another host - the backend loads
it from its view of the store (re-reading the store only if the view lacks it) into every enclave
and asks once more. KMS credentials are handed over again every `credentials_every_s` (role
credentials rotate).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from schemas.records import SealedKey
from schemas.refusals import Code

from .channel import EnclaveConnection
from .credentials import Credentials
from .keys import KeyManager, load_frames, newest
from .keystore import KeyStore, KeyStoreError
from .metrics import HostMetrics
from .pool import EnclavePool, PoolSettings

log = structlog.get_logger("backend")

DEFAULT_PRELOAD_KEYS = 10_000  # SIGNER_PRELOAD_KEYS
# keys pushed on demand, at most this many pushes at once: each is a key operation on one connection of every
# enclave, and an enclave drops a connection with more than 8 key operations in flight (admin operations,
# credentials and connect-time loads share that budget)
PUSHES_AT_ONCE = 2

Session = tuple[EnclaveConnection, int]  # a connection and its connect count: one unbroken connection


class EnclaveBackend:
    def __init__(
        self,
        urls: list[str],
        store: KeyStore,
        settings: PoolSettings | None = None,
        metrics: HostMetrics | None = None,
        *,
        default_keyring: str = "default",
        credentials: Callable[[], Credentials | None] | None = None,
        credentials_every_s: float = 300.0,
        preload_keys: int = DEFAULT_PRELOAD_KEYS,
    ) -> None:
        if preload_keys < 0:
            raise ValueError("preload_keys must be >= 0 (SIGNER_PRELOAD_KEYS)")
        self.store = store
        self.metrics = metrics or HostMetrics()
        self.pool = EnclavePool(urls, settings, self.metrics)
        self.keys = KeyManager(self.pool, store, default_keyring, preload_keys)
        self.credentials = credentials  # None: the enclaves have credentials of their own
        self.credentials_every_s = credentials_every_s
        self._refresher: asyncio.Task[None] | None = None
        self._store_started = False
        self.preload_keys = preload_keys
        # per enclave URL: connections that have been up, unbroken, since that enclave process got the
        # preloaded keys (one of them got them); while one of them is still up, so is that process
        self._preloaded: dict[str, set[Session]] = {}
        self._preload_locks: dict[str, asyncio.Lock] = {}
        self._pushes = asyncio.Semaphore(PUSHES_AT_ONCE)
        self.pool.on_connect(self.load_into)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, ready_timeout: float | None = None) -> None:
        """Read the key store, then connect to every enclave; with a timeout, return once one connection is
        live (else TimeoutError)."""
        if not self._store_started:
            await self.store.start()
            self._store_started = True
        if self.credentials is not None and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_credentials(), name="kms-credentials")
        await self.pool.start(ready_timeout=ready_timeout)

    async def wait_ready(self) -> None:
        await self.pool.wait_ready()

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self.pool.close()
        if self._store_started:
            await self.store.close()
            self._store_started = False

    # -- signing -----------------------------------------------------------------------------------

    def route_key(self, key_id: str) -> str:
        """Requests route by keyring, so a keyring's data key is unwrapped by one enclave."""
        sealed = self.store.get_key(key_id)
        return sealed.keyring_id if sealed is not None else key_id

    async def sign_many(self, items: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        """Encoded SignRequests, as (key id, bytes), to the enclaves; their results, in order.

        A key the enclaves do not know may have been created through another host: re-read the
        store, load what it has, and ask again once."""
        route = self.route_key
        results = await self.pool.submit_many([(route(key_id), raw) for key_id, raw in items])
        missing = [i for i, r in enumerate(results) if (r.get("error") or {}).get("code") == Code.UNKNOWN_KEY]
        if missing:
            found = await self.reload_keys({items[i][0] for i in missing})
            retry = [i for i in missing if items[i][0] in found]
            if retry:
                again = await self.pool.submit_many([(route(items[i][0]), items[i][1]) for i in retry])
                for i, res in zip(retry, again, strict=True):
                    results[i] = res
        return results

    @property
    def outstanding(self) -> int:
        """Requests in the enclave pool: queued or in flight on a connection, or waiting to be re-sent."""
        return self.pool.queued + self.pool.in_flight

    async def sign(self, key_id: str, raw: bytes) -> dict[str, Any]:
        """One request (the hot path signs batches)."""
        return (await self.sign_many([(key_id, raw)]))[0]

    # -- key management ----------------------------------------------------------------------------

    async def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One admin operation (sign.admin), relayed to an enclave; raises KeyOpError."""
        return await self.keys.handle(op, args)

    async def load_into(self, conn: EnclaveConnection) -> None:
        """A new connection (the pool's connect event): its enclave gets the KMS credentials, every keyring
        envelope and the preloaded keys before it takes work. Connections of one enclave URL share one
        enclave process: while another of its connections has been up, unbroken, since that process got
        the keys, this one gets only the envelopes (cheap, and current)."""
        await self.push_credentials(conn)
        async with self._preload_locks.setdefault(conn.url, asyncio.Lock()):  # siblings wait for the first
            sessions = {s for s in self._preloaded.get(conn.url, set()) if _unbroken(s)}
            keys = [] if sessions else [k.to_wire() for k in self.preload()]
            envelopes = [e.to_wire() for e in self.store.envelopes()]
            for args in load_frames(envelopes, keys):
                await conn.key_op("keyrings.load", args)
            self._preloaded[conn.url] = sessions | {(conn, conn.stats.connects)}
        if keys:
            log.info("keys_preloaded", channel=conn.name, keys=len(keys), envelopes=len(envelopes))

    def preload(self) -> list[SealedKey]:
        """The keys a new enclave gets before any is asked for: the `preload_keys` most recently created,
        oldest first. Every other key is pushed on its first request (unknown_key)."""
        return newest(self.store.keys(), self.preload_keys)

    async def reload_keys(self, key_ids: set[str]) -> set[str]:
        """Keys another host created (or an enclave let go): read the store up to now if this host's view
        lacks any of them, and load those found into every enclave. A store that cannot be read now finds
        only what the view holds (the rest stay unknown_key); it is logged."""
        if any(self.store.get_key(k) is None for k in key_ids):
            try:
                await self.store.refresh()
            except KeyStoreError as exc:
                log.warning("keystore_refresh_failed", store=self.store.url, error=str(exc)[:300])
        sealed = [s for k in key_ids if (s := self.store.get_key(k)) is not None]
        if sealed:
            rings = {s.keyring_id for s in sealed}
            envelopes = [e.to_wire() for e in self.store.envelopes() if e.keyring_id in rings]
            async with self._pushes:
                for load in load_frames(envelopes, [s.to_wire() for s in sealed]):
                    await self.pool.broadcast("keyrings.load", load)
        return {s.key_id for s in sealed}

    async def push_credentials(self, conn: EnclaveConnection | None = None) -> None:
        """Hand the current KMS credentials to one enclave (or all of them), if this host has any."""
        creds = self.credentials() if self.credentials else None
        if not creds:
            return
        if conn is not None:
            await conn.key_op("kms.credentials", creds)
        else:
            await self.pool.broadcast("kms.credentials", creds)

    async def _refresh_credentials(self) -> None:
        while True:  # role credentials rotate hourly: refresh the enclaves well within that
            await asyncio.sleep(self.credentials_every_s)
            try:
                await self.push_credentials()
            except Exception as exc:  # an enclave going away meanwhile; the next round or connect retries
                log.warning("kms_credentials_push_failed", error=repr(exc)[:200])

    # -- observability -----------------------------------------------------------------------------

    def enclave_stats(self) -> dict[str, dict[str, Any]]:
        """Each enclave's counters, as its last pong reported them (exported with an `enclave` label)."""
        out: dict[str, dict[str, Any]] = {}
        for conn in self.pool.connections:
            if conn.enclave_id and conn.enclave_stats:
                out.setdefault(conn.enclave_id, conn.enclave_stats)
        return out


def _unbroken(session: Session) -> bool:
    """The connection is still the one it was then (not lost, nor connected again since)."""
    conn, connects = session
    return conn.connected and conn.stats.connects == connects
