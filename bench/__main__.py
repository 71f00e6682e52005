"""python -m bench e2e [-n N]: a first, rough end-to-end figure and the raw signing ceiling, in one run.

The full harness (open/closed loop, HDR latencies, sweeps, the reference design) is
`python -m bench report`; `e2e` measures N secp256k1_digest requests produced to Kafka
at once, time until the last result is consumed, versus coincurve's raw sign rate on
one core. The ratio is what matters on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.logs import configure_logging
from signer.cluster import LocalCluster

from .ceiling import raw_sign_rate


async def end_to_end(n: int) -> dict[str, float]:
    async with LocalCluster(http_port=0) as cluster:
        bootstrap, layout = cluster.bootstrap, cluster.config.layout  # type: ignore[union-attr]
        # the dev operator signs the operation and verifies the enclave's receipt
        key = await cluster.admin().create_key("secp256k1", "default")
        payloads = [
            msgpack.packb(
                {
                    "v": 1,
                    "request_id": f"b-{i}",
                    "key_id": key["key_id"],
                    "scheme": "secp256k1_digest",
                    "payload": os.urandom(32),
                }
            )
            for i in range(n)
        ]
        consumer = AIOKafkaConsumer(layout.results, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await consumer.start()
        await producer.start()
        try:
            t0 = time.perf_counter()
            for i, p in enumerate(payloads):
                # spread over partitions as distinct wallets would
                await producer.send(layout.requests, p, key=str(i % 64).encode())
            await producer.flush()
            t_produced = time.perf_counter() - t0
            seen: set[str] = set()
            async with asyncio.timeout(300):
                while len(seen) < n:
                    for recs in (await consumer.getmany(timeout_ms=500)).values():
                        for rec in recs:
                            seen.add(msgpack.unpackb(rec.value)["request_id"])
            elapsed = time.perf_counter() - t0
        finally:
            await producer.stop()
            await consumer.stop()
    return {"requests": n, "seconds": elapsed, "produce_seconds": t_produced, "per_second": n / elapsed}


def _run(coro: Any) -> Any:
    """uvloop when it is installed (the load generator must not be the limit), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    commands = ["report", "profile", "settings", "soak", "e2e", "channel", "vault", "schemes", "gateway", "keys"]
    ap.add_argument("what", nargs="?", choices=commands, default="report")
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench"), help="report directory (report)")
    ap.add_argument(
        "--smoke", action="store_true", help="a tiny configuration that checks the harness (report, gateway, keys)"
    )
    ap.add_argument("--flamegraphs", action="store_true", help="py-spy flame graphs (profile)")
    ap.add_argument("--host-env", action="append", default=[], metavar="NAME=VALUE",
                    help="a host setting (profile; settings: an extra profile; repeatable)")  # fmt: skip
    ap.add_argument("--minutes", type=float, default=10.0, help="open-loop minutes (soak)")
    ap.add_argument("--fault-every", type=float, default=180.0,
                    help="seconds between faults, fewer on a short run; 0: no faults (soak)")  # fmt: skip
    ap.add_argument("--bootstrap", default="", help="use this Kafka instead of starting one (gateway, keys)")
    ap.add_argument("--keys", type=int, default=100_000, help="keys in the store (keys)")
    ap.add_argument("--keystore", default="", help="the key store's URL (keys; default a fresh kafka:///TOPIC)")
    ap.add_argument("--preload", type=int, default=10_000, help="SIGNER_PRELOAD_KEYS of the new host (keys)")
    ap.add_argument("--sample", type=int, default=300, help="first signatures measured of each kind (keys)")
    ap.add_argument("--concurrency", type=int, default=6, help="key creations at a time, at most 8 (keys)")
    ap.add_argument("--enclave-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an enclave setting, e.g. ENCLAVE_MAX_KEYS=50000 (keys; repeatable)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every profile; medians reported (settings)")
    ap.add_argument("-n", type=int, default=20000)
    args = ap.parse_args()
    configure_logging("bench", os.environ.get("SIGNER_LOG_LEVEL", "WARNING"))
    if args.what == "report":
        from .harness import SMOKE, Profile, run_report

        report = _run(run_report(args.out, SMOKE if args.smoke else Profile()))
        print((args.out / "report.md").read_text())
        print(json.dumps({k: report[k] for k in ("max_per_second", "efficiency", "speedup_over_reference")}))
        return
    if args.what == "profile":
        from .profile import run_profile

        out = args.out if args.out != Path("artifacts/bench") else Path("artifacts/profile")
        total = args.n if args.n != 20000 else 30_000
        host_env = dict(item.split("=", 1) for item in args.host_env)
        _run(run_profile(out, total=total, flamegraphs=args.flamegraphs, host_env=host_env or None))
        print((out / "profile.md").read_text())
        return
    if args.what == "settings":
        from .settings import PROFILES, run_settings

        out = args.out if args.out != Path("artifacts/bench") else Path("artifacts/settings")
        total = args.n if args.n != 20000 else 30_000
        custom = dict(item.split("=", 1) for item in args.host_env)
        profiles = {**PROFILES, "custom": custom} if custom else PROFILES
        _run(run_settings(out, total=total, profiles=profiles, rounds=args.rounds))
        print((out / "settings.md").read_text())
        return
    if args.what == "soak":
        from .soak import run_soak

        out = args.out if args.out != Path("artifacts/bench") else Path("artifacts/soak")
        _run(run_soak(out, args.minutes, args.fault_every))
        print((out / "soak.md").read_text())
        return
    if args.what == "gateway":
        from .gateway import SMOKE as GATEWAY_SMOKE
        from .gateway import GatewayProfile, run_gateway_bench

        out = args.out if args.out != Path("artifacts/bench") else Path("artifacts/gateway")
        _run(run_gateway_bench(out, GATEWAY_SMOKE if args.smoke else GatewayProfile(), args.bootstrap))
        print((out / "gateway.md").read_text())
        return
    if args.what == "keys":
        from .keys import SMOKE as KEYS_SMOKE
        from .keys import KeysProfile, run_keys_bench

        out = args.out if args.out != Path("artifacts/bench") else Path("artifacts/keys")
        profile = KEYS_SMOKE if args.smoke else KeysProfile(args.keys, args.preload, args.sample, args.concurrency)
        enclave_env = dict(item.split("=", 1) for item in args.enclave_env)
        _run(run_keys_bench(out, profile, args.bootstrap, args.keystore, enclave_env))
        print((out / "keys.md").read_text())
        return
    if args.what == "schemes":
        from .schemes import run_scheme_bench

        print(json.dumps(run_scheme_bench(min(args.n, 5000)), indent=2))
        return
    if args.what == "vault":
        from .vault import run_vault_bench

        print(json.dumps(_run(run_vault_bench(signatures=args.n)), indent=2))
        return
    if args.what == "channel":
        from .channel import run_channel_bench

        print(json.dumps(_run(run_channel_bench(args.n)), indent=2))
        return
    raw = raw_sign_rate()
    e2e = _run(end_to_end(args.n))
    report = {"raw_sign_per_second_one_core": round(raw), **{k: round(v, 3) for k, v in e2e.items()}}
    report["efficiency_vs_one_core"] = round(e2e["per_second"] / raw, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
