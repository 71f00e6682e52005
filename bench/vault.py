"""Key vault costs, in one run: a cold keyring unwrap (attestation + KMS Decrypt + CMS) against
a warm signature, and KMS calls per 1000 signatures at steady state.

Real parts: the dev KMS and an enclave worker process; the host side is the library's
enclave backend (pool, key manager, key store).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from signer.backend import EnclaveBackend
from signer.pool import PoolSettings
from signer.topology import Enclave, Topology


def _req(i: int, key_id: str) -> bytes:
    return msgpack.packb(
        {"v": 1, "request_id": f"v{i}", "key_id": key_id, "scheme": "secp256k1_digest", "payload": os.urandom(32)}
    )


async def _kms_calls(url: str, reset: bool = False) -> dict[str, int]:
    async with aiohttp.ClientSession() as s:
        if reset:
            await s.post(f"{url}/_dev/stats/reset")
        async with s.get(f"{url}/_dev/stats") as r:
            return dict((await r.json())["calls"])


async def run_vault_bench(keyrings: int = 5, keys_per_ring: int = 10, signatures: int = 20_000) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="signer-vault-bench-"))
    topology = Topology(work, sock_dir=work, log_level="WARNING")

    async def enclave_and_host(name: str) -> tuple[Enclave, EnclaveBackend]:
        enclave = await topology.start_enclave(name)
        return enclave, await topology.start_backend(PoolSettings(connections_per_enclave=1), urls=[enclave.url])

    async def stop(enclave: Enclave, backend: EnclaveBackend) -> None:
        await backend.close()
        await enclave.process.astop()

    try:
        url = await topology.start_kms()
        dev = await topology.provision()
        enclave, backend = await enclave_and_host("create")
        operator = dev.admin(backend.handle)  # the dev operator signs each creation and verifies its receipt
        key_ids = [
            (await operator.create_key("secp256k1", f"ring{r}"))["key_id"]
            for r in range(keyrings)
            for _ in range(keys_per_ring)
        ]
        await stop(enclave, backend)

        enclave, backend = await enclave_and_host("cold")  # a fresh process: every data key is cold
        await _kms_calls(url, reset=True)
        cold = []
        for r in range(keyrings):  # first signature per keyring: includes the unwrap
            k = key_ids[r * keys_per_ring]
            t0 = time.perf_counter()
            res = await backend.sign(k, _req(r, k))
            assert res["status"] == "ok", res
            cold.append(time.perf_counter() - t0)
        warm = []
        for i in range(200):
            k = key_ids[i % len(key_ids)]
            t0 = time.perf_counter()
            await backend.sign(k, _req(i, k))
            warm.append(time.perf_counter() - t0)
        await _kms_calls(url, reset=True)
        batch = [(key_ids[i % len(key_ids)], _req(i, key_ids[i % len(key_ids)])) for i in range(signatures)]
        t0 = time.perf_counter()
        results = await backend.sign_many(batch)
        elapsed = time.perf_counter() - t0
        assert all(r["status"] == "ok" for r in results)
        steady_calls = sum((await _kms_calls(url)).values())
    finally:
        await topology.aclose()
    cold_ms = sorted(c * 1000 for c in cold)
    warm_ms = sorted(w * 1000 for w in warm)
    return {
        "keyrings": keyrings,
        "keys": len(key_ids),
        "cold_first_signature_ms_median": round(cold_ms[len(cold_ms) // 2], 2),
        "warm_single_signature_ms_median": round(warm_ms[len(warm_ms) // 2], 3),
        "cold_over_warm": round(cold_ms[len(cold_ms) // 2] / warm_ms[len(warm_ms) // 2], 1),
        "steady_state_signatures": signatures,
        "steady_state_signatures_per_s": round(signatures / elapsed),
        "kms_calls_per_1000_signatures_steady_state": round(steady_calls * 1000 / signatures, 3),
    }
