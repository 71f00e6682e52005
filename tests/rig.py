"""A small real cluster without Kafka: dev KMS and enclave worker processes, with the host's
pool, key manager and key store in-process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from eth_account import Account

from signer.channel import ChannelSettings
from signer.keys import KeyManager
from signer.keystore import DirectoryKeyStore
from signer.metrics import EnclaveStatsCollector, HostMetrics
from signer.operator import AdminSession
from signer.pool import EnclavePool, PoolSettings
from tests.enclaves import dev_enclave, start_devkms, start_enclave, wait_until
from tests.procs import Proc


class Rig:
    """Dev KMS + enclave worker processes + the host side (pool, key manager, key store) in-process."""

    def __init__(
        self, tmp: Path, sock_dir: Path, enclaves: int = 1, pythonpath: str | None = None,
        host_credentials: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.host_credentials = host_credentials  # if set: enclaves start without KMS credentials and get these
        self.tmp, self.sock_dir, self.n, self.pythonpath = tmp, sock_dir, enclaves, pythonpath
        self.procs: list[Proc] = []
        self.kms_proc: Proc | None = None
        self.kms_url = ""
        self.kms_key_id = ""
        self.urls: list[str] = []
        self.metrics = HostMetrics()
        self.pool: EnclavePool | None = None
        self.keys: KeyManager | None = None
        self.admin: AdminSession | None = None  # the dev operator, over the key manager in-process

    async def start(self, kms_key_id: str | None = None, url_wrap: Any = None) -> Rig:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.kms_proc, self.kms_url = start_devkms(self.tmp / "devkms", self.tmp)
        self.dev = await dev_enclave(self.kms_url, self.tmp, kms_key_id)
        self.kms_key_id = self.dev.kms_key_arn
        env = self.dev.env
        if self.host_credentials is not None:
            env = {
                k: v for k, v in env.items() if k not in ("SIGNER_KMS_ACCESS_KEY_ID", "SIGNER_KMS_SECRET_ACCESS_KEY")
            }
        for i in range(self.n):
            proc, url = start_enclave(self.sock_dir, f"enc{i}", self.tmp, env=env, pythonpath=self.pythonpath)
            self.procs.append(proc)
            self.urls.append(await url_wrap(url) if url_wrap else url)
        store = DirectoryKeyStore(self.tmp / "keystore")
        settings = PoolSettings(connections_per_enclave=2, channel=ChannelSettings(heartbeat_interval_s=0.1))
        self.pool = EnclavePool(self.urls, settings, self.metrics, prepare=self._prepare)
        creds = self.host_credentials
        self.keys = KeyManager(self.pool, store, credentials=(lambda: creds) if creds else None)
        self.admin = self.dev.admin(self.keys.handle)
        EnclaveStatsCollector(self._stats, self.metrics.registry)
        await self.pool.start(ready_timeout=20)
        await wait_until(lambda: len(self.pool.live()) == 2 * self.n, what="all connections")  # type: ignore[union-attr]
        return self

    async def _prepare(self, conn: Any) -> None:
        assert self.keys is not None
        await self.keys.load_into(conn)

    def _stats(self) -> dict[str, dict[str, Any]]:
        assert self.pool is not None
        return {c.enclave_id: c.enclave_stats for c in self.pool.connections if c.enclave_stats}

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        for p in self.procs:
            p.stop()
        self.procs = []
        if self.kms_proc is not None:
            self.kms_proc.stop()

    async def create(
        self, scheme: str = "secp256k1", keyring: str = "default", policy: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        assert self.admin is not None
        return await self.admin.create_key(scheme, keyring, policy)

    async def sign(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.pool is not None and self.keys is not None
        return await self.pool.submit_many([(self.keys.route_key(r["key_id"]), msgpack.packb(r)) for r in reqs])

    async def kms_stats(self, reset: bool = False) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            if reset:
                await s.post(f"{self.kms_url}/_dev/stats/reset")
            async with s.get(f"{self.kms_url}/_dev/stats") as r:
                return dict(await r.json())

    async def throttle(self, n: int) -> None:
        async with aiohttp.ClientSession() as s:
            await s.post(f"{self.kms_url}/_dev/throttle", json={"next": n})


def digest_req(rid: str, key_id: str, **kw: Any) -> dict[str, Any]:
    return {"v": 1, "request_id": rid, "key_id": key_id, "scheme": "secp256k1_digest", "payload": os.urandom(32), **kw}


def recovered(req: dict[str, Any], res: dict[str, Any]) -> str:
    sig = res["signature"]
    vrs = (sig[64] + 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
    return str(Account._recover_hash(req["payload"], vrs=vrs))
