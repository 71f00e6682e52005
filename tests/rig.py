"""A small real cluster without Kafka: dev KMS and enclave worker processes, with the host's
enclave backend (pool, key manager, key store) in-process (signer/topology.py builds it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from eth_account import Account

from signer.backend import EnclaveBackend
from signer.channel import ChannelSettings
from signer.metrics import EnclaveStatsCollector, HostMetrics
from signer.operator import AdminSession
from signer.pool import EnclavePool, PoolSettings
from signer.topology import Enclaves, Topology
from tests.enclaves import wait_until


class Rig:
    """Dev KMS + enclave worker processes + the host's enclave backend in-process."""

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
        self.backend: EnclaveBackend | None = None
        self.pool: EnclavePool | None = None  # the backend's
        self.admin: AdminSession | None = None  # the dev operator, over the backend's key manager in-process

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
        backend = await topo.start_backend(settings, urls=self.urls, metrics=self.metrics,
                                           credentials=(lambda: creds) if creds else None)  # fmt: skip
        self.backend, self.pool = backend, backend.pool
        self.admin = self.dev.admin(backend.handle)
        EnclaveStatsCollector(backend.enclave_stats, self.metrics.registry)
        await wait_until(lambda: len(backend.pool.live()) == 2 * self.n, what="all connections")
        return self

    async def stop(self) -> None:
        await self.topology.aclose()

    async def create(
        self, scheme: str = "secp256k1", keyring: str = "default", policy: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        assert self.admin is not None
        return await self.admin.create_key(scheme, keyring, policy)

    async def sign(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.backend is not None
        return await self.backend.sign_many([(r["key_id"], msgpack.packb(r)) for r in reqs])

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
