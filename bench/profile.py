"""`python -m bench profile`: where the CPU goes, as ratios to one raw signature, in one run.

One host process and two enclave worker processes over a real Kafka broker and the dev KMS;
the load is `secp256k1_digest` only (one signature per request, no hashing or RLP), so every
figure compares with coincurve's raw `sign_recoverable`, measured in the same run:

- raw signature: CPU time per coincurve signature, measured before and after the runs;
- closed loop (4,000 outstanding): the maximum, and CPU per request of the host, the enclaves,
  the Kafka broker and this load generator (utime+stime from /proc);
- open loop at 200/s (the latency floor), at 50% and at 80% of the maximum: p50/p99 from the
  intended send time (coordinated-omission-safe), requests produced by a process of their own
  (bench/loadgen.py) so that sending never delays receiving;
- with `--flamegraphs`: py-spy flame graphs (SVG) of the host and of the busier enclave under
  a second closed loop (py-spy slows what it samples, so no figure is taken from that run).

Written to --out (default artifacts/profile): profile.json, profile.md, host.svg, enclave.svg.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgpack

from .ceiling import raw_sign_cpu_us
from .harness import Stack, admin, cpu_seconds, drive, progress, start_host, start_stack


def digest_request(i: int, keys: list[dict[str, Any]], rnd: random.Random) -> tuple[bytes, bytes]:
    key = keys[i % len(keys)]
    body = {"v": 1, "request_id": f"r{i}", "key_id": key["key_id"], "scheme": "secp256k1_digest",
            "payload": rnd.randbytes(32)}  # fmt: skip
    return key["key_id"].encode(), msgpack.packb(body)


async def run_profile(out: Path, total: int = 30_000, open_seconds: float = 10.0, flamegraphs: bool = False,
                      host_env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    work = Path(tempfile.mkdtemp(prefix="signer-profile-"))
    progress("raw coincurve ceiling")
    before = raw_sign_cpu_us(1.0)
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "requests": total, "host_env": host_env or {}}
    stack = await start_stack(work, enclaves=2)
    try:
        host = await start_host(stack, enclaves=2, env=host_env)
        operator = admin(stack, host)
        for i in range(8):
            stack.keys.append(await operator.create_key("secp256k1", f"bench{i % 4}"))
        progress("warm-up")
        await drive(stack, host, "warm-up", 3000, outstanding=4000, make=digest_request)
        closed = await drive(stack, host, "closed loop (max)", total, outstanding=4000, make=digest_request)
        runs = [closed]
        for name, rate in (("open loop 200/s", 200.0), ("open loop 50%", closed.per_second * 0.5),
                           ("open loop 80%", closed.per_second * 0.8)):  # fmt: skip
            n = max(50, int(rate * open_seconds))
            runs.append(await drive(stack, host, f"{name} ({rate:.0f}/s)", n, rate=rate, make=digest_request,
                                    linger_ms=0, separate=True))  # fmt: skip
        if flamegraphs:
            report["flamegraphs"] = await _flamegraphs(stack, host.process.pid, out, total)
        await host.process.astop()
        report["hot_key"] = await _hot_key(stack, total // 2)
    finally:
        await stack.close()
    print(file=sys.stderr)
    raw_us = (before + raw_sign_cpu_us(1.0)) / 2  # before and after the runs
    raw = 1e6 / raw_us
    report["raw_sign_cpu_us"] = round(raw_us, 2)
    report["raw_sign_per_second"] = round(raw)
    report["runs"] = [r.summary() for r in runs]
    cluster_us = closed.host_cpu_us + closed.enclave_cpu_us + closed.broker_cpu_us
    report["ratios"] = {
        "host_cpu_per_request_over_raw_sign": round(closed.host_cpu_us / raw_us, 2),
        "enclave_cpu_per_request_over_raw_sign": round(closed.enclave_cpu_us / raw_us, 2),
        "broker_cpu_per_request_over_raw_sign": round(closed.broker_cpu_us / raw_us, 2),
        "cluster_cpu_per_request_over_raw_sign": round(cluster_us / raw_us, 2),
        "throughput_over_one_core_raw_rate": round(closed.per_second / raw, 3),
    }
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    (out / "profile.md").write_text(markdown(report))
    return report


def hot_key_request(i: int, keys: list[dict[str, Any]], rnd: random.Random) -> tuple[bytes, bytes]:
    return digest_request(i, keys[:1], rnd)


async def _hot_key(stack: Stack, total: int) -> dict[str, Any]:
    """One wallet only, closed loop: through a host over one enclave, then over two. The keyring's
    enclave spills to the other one past SIGNER_SPILL_AFTER outstanding requests, so the second run
    should be faster by up to the number of enclaves."""
    out: dict[str, Any] = {}
    for n in (1, 2):
        host = await start_host(stack, enclaves=n)
        try:
            await drive(stack, host, "hot key warm-up", 2000, outstanding=4000, make=hot_key_request)
            name = f"one hot key, {n} enclave(s)"
            run = await drive(stack, host, name, total, outstanding=4000, make=hot_key_request)
            out[f"{n}_enclaves"] = run.summary()
        finally:
            await host.process.astop()
    out["speedup_2_over_1"] = round(out["2_enclaves"]["per_second"] / max(1, out["1_enclaves"]["per_second"]), 2)
    return out


async def _flamegraphs(stack: Stack, host_pid: int, out: Path, total: int) -> dict[str, str]:
    """py-spy records the host and the busier enclave while a second closed loop runs."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if spy is None:
        raise SystemExit("py-spy is not installed (pip install py-spy): needed for --flamegraphs")
    enclaves = [e.process.pid for e in stack.enclaves if e.process.running]
    busiest = max(enclaves, key=cpu_seconds)
    targets = {"host.svg": host_pid, "enclave.svg": busiest}
    spies = []
    for name, pid in targets.items():
        cmd = [spy, "record", "--nonblocking", "--rate", "250", "--pid", str(pid), "--output", str(out / name)]
        # started once, stopped below by pid
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # noqa: ASYNC220
    try:
        progress("closed loop under py-spy")
        host = next(h for h in stack.topology.hosts.values() if h.process.pid == host_pid)
        await drive(stack, host, "closed loop (py-spy)", total, outstanding=4000, make=digest_request)
    finally:
        for p in spies:  # py-spy writes its SVG on SIGINT
            p.send_signal(signal.SIGINT)
        for p in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(p.wait, 60)
            if p.poll() is None:
                p.kill()
                p.wait()
    return {name: str(out / name) for name in targets}


def markdown(r: dict[str, Any]) -> str:
    q = r["ratios"]
    lines = [
        "# Where the CPU goes (`python -m bench profile`)",
        "",
        f"- raw coincurve `sign_recoverable`: **{r['raw_sign_cpu_us']} us** of CPU per signature "
        f"(= **{r['raw_sign_per_second']:,}**/s on one core; the mean of a measure before and after the runs)",
        f"- host CPU per request at the closed-loop maximum / raw signature: "
        f"**{q['host_cpu_per_request_over_raw_sign']}x**",
        f"- enclave CPU per `secp256k1_digest` request / raw signature: "
        f"**{q['enclave_cpu_per_request_over_raw_sign']}x**",
        f"- Kafka broker CPU per request / raw signature: **{q['broker_cpu_per_request_over_raw_sign']}x**",
        f"- cluster CPU per signature (host + enclaves + broker) / raw signature: "
        f"**{q['cluster_cpu_per_request_over_raw_sign']}x**",
        f"- digest throughput through Kafka / one core's raw sign rate: **{q['throughput_over_one_core_raw_rate']}**",
        "",
        "| run | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | host CPU us/req | enclave CPU us/req "
        "| broker CPU us/req | load generator CPU us/req | host RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        lat = run["latency_ms"]
        lines.append(
            f"| {run['name']} | {run['per_second']:,} | {lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['p99.9']} | "
            f"{run['host_cpu_us_per_request']} | {run['enclave_cpu_us_per_request']} | "
            f"{run['broker_cpu_us_per_request']} | {run['loadgen_cpu_us_per_request']} | {run['host_rss_mb']} |"
        )
    half = next((run for run in r["runs"] if run["name"].startswith("open loop 50%")), None)
    if half is not None:
        lines += ["", f"Where a request's time goes at 50% of the maximum ({half['name']}): mean ms per stage, "
                  "from the host's `signer_stage_seconds`", "", "| stage | ms |", "|---|---|"]  # fmt: skip
        lines += [f"| {stage} | {ms} |" for stage, ms in half["stage_ms_per_request"].items()]
    hot = r.get("hot_key")
    if hot:
        lines += ["", f"One hot key (closed loop, one wallet): {hot['1_enclaves']['per_second']:,}/s over one enclave, "
                  f"{hot['2_enclaves']['per_second']:,}/s over two: **{hot['speedup_2_over_1']}x**."]  # fmt: skip
    if r.get("flamegraphs"):
        lines += ["", "Flame graphs (py-spy, a second closed loop): host.svg, enclave.svg."]
    return "\n".join(lines) + "\n"
