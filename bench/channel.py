"""Channel throughput over a Unix socket with a no-op enclave handler, three ways in one run:

- batched: the pool as configured (frames of many requests, persistent connection);
- one request per frame: the same persistent connection, max_batch=1 and no window;
- new connection per request: the reference design (connect, HELLO, one request, close).

The enclave worker runs in its own process (`--handler noop`), so what is measured is
framing, syscalls, and event-loop work on both sides, not signing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from schemas import frames
from schemas.transport import open_channel
from signer.channel import ChannelSettings
from signer.pool import EnclavePool, PoolSettings
from signer.topology import Topology


def _requests(n: int) -> list[bytes]:
    return [
        msgpack.packb(
            {
                "v": 1,
                "request_id": f"r{i}",
                "key_id": "k_bench",
                "scheme": "secp256k1_digest",
                "payload": os.urandom(32),
            }
        )
        for i in range(n)
    ]


async def _pool_rate(url: str, raws: list[bytes], channel: ChannelSettings) -> float:
    pool = EnclavePool([url], PoolSettings(connections_per_enclave=1, channel=channel))
    await pool.start(ready_timeout=10)
    try:
        t0 = time.perf_counter()
        await pool.submit_many([("k_bench", r) for r in raws])
        return len(raws) / (time.perf_counter() - t0)
    finally:
        await pool.close()


async def _connection_per_request_rate(url: str, raws: list[bytes]) -> float:
    t0 = time.perf_counter()
    for i, raw in enumerate(raws):
        reader, writer = await open_channel(url)
        await frames.read_frame(reader)  # HELLO
        await frames.write_frame(writer, frames.encode_frame({"t": frames.SIGN, "items": [[i, raw]]}))
        reply = await frames.read_frame(reader)
        assert reply["t"] == frames.RESULTS
        writer.close()
        await writer.wait_closed()
    return len(raws) / (time.perf_counter() - t0)


async def run_channel_bench(n: int = 50_000) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="signer-bench-"))
    topology = Topology(workdir, sock_dir=workdir, log_level="WARNING")
    try:
        url = (await topology.start_enclave("noop", handler="noop", credits=4096)).url
        batched = await _pool_rate(url, _requests(n), ChannelSettings())
        per_frame = await _pool_rate(url, _requests(n // 5), ChannelSettings(max_batch=1, batch_window_s=0))
        per_conn = await _connection_per_request_rate(url, _requests(max(200, n // 50)))
    finally:
        await topology.aclose()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "requests_per_s": {
            "batched": round(batched),
            "one_request_per_frame": round(per_frame),
            "new_connection_per_request": round(per_conn),
        },
        "ratio_batched_vs_one_per_frame": round(batched / per_frame, 1),
        "ratio_batched_vs_connection_per_request": round(batched / per_conn, 1),
    }
