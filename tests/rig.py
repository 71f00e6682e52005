"""A small real cluster without Kafka: dev KMS and enclave worker processes, with the host's
pool, key manager and key store in-process (signer/topology.py builds it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from eth_account import Account

from signer.channel import ChannelSettings
from signer.keys import KeyManager
from signer.metrics import EnclaveStatsCollector, HostMetrics
from signer.operator import AdminSession
from signer.pool import EnclavePool, PoolSettings
from signer.topology import Enclaves, Topology
from tests.enclaves import wait_until


class Rig:
    """Dev KMS + enclave worker processes + the host side (pool, key manager, key store) in-process."""

    def __init__(
        self, tmp: Path, sock_dir: Path, enclaves: int = 1, pythonpath: str | None = None,
        host_credentials: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.host_credentials = host_credentials  # if set: enclaves start without KMS credentials and get these
        self.tmp, self.n, self.pythonpath = tmp, enclaves, pythonpath
        self.topology = Topology(tmp, sock_dir=sock_dir, log_dir=tmp)
        self.kms_key_id = ""
        self.urls: list[str] = []
        self.metrics = HostMetrics()
        self.pool: EnclavePool | None = None
        self.keys: KeyManager | None = None
        self.admin: AdminSession | None = None  # the dev operator, over the key manager in-process

    @property
    def kms_url(self) -> str:
        return self.topology.kms_url

    async def start(self, kms_key_id: str | None = None, url_wrap: Any = None) -> Rig:
        topo = self.topology
        await topo.start_kms()
        self.dev = await topo.provision(kms_key_id)
        self.kms_key_id = self.dev.kms_key_arn
        spec = Enclaves(self.n, "enc", pythonpath=self.pythonpath, kms_credentials=self.host_credentials is None)
        for enclave in await topo.start_enclaves(spec):
            self.urls.append(await url_wrap(enclave.url) if url_wrap else enclave.url)
        creds = self.host_credentials
        settings = PoolSettings(connections_per_enclave=2, channel=ChannelSettings(heartbeat_interval_s=0.1))
        side = await topo.start_host_side(settings, urls=self.urls, metrics=self.metrics,
                                          credentials=(lambda: creds) if creds else None)  # fmt: skip
        self.pool, self.keys = side.pool, side.keys
        self.admin = self.dev.admin(self.keys.handle)
        EnclaveStatsCollector(self._stats, self.metrics.registry)
        await wait_until(lambda: len(side.pool.live()) == 2 * self.n, what="all connections")
        return self

    def _stats(self) -> dict[str, dict[str, Any]]:
        assert self.pool is not None
        return {c.enclave_id: c.enclave_stats for c in self.pool.connections if c.enclave_stats}

    async def stop(self) -> None:
        await self.topology.aclose()

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
