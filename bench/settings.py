"""`python -m bench settings`: the host's latency and throughput settings compared, in one run.

One Kafka broker, the dev KMS and two enclave workers, warmed up first (the broker's JIT and
the enclaves' data keys: a closed loop through a host that is then stopped); then, in each of
`rounds` rounds, for each settings profile in turn a fresh host process with those settings and
the same `secp256k1_digest` load as `bench profile`:

- a closed loop (4,000 outstanding): the maximum, and host and enclave CPU per request as ratios
  to one raw coincurve signature measured in the same run;
- open loops at 200/s and at 50% and 80% of the *first* profile's maximum (the same offered load
  for every profile), requests produced by a process of their own: p50/p99 from the intended send
  time.

Each figure reported is the median over the rounds (the machine is shared and noisy; each
round's figures are in settings.json). The profiles are the ones docs/configuration.md
describes; `--host-env NAME=VALUE` adds a profile of its own (named "custom"). Written to --out
(default artifacts/settings): settings.json, settings.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from .ceiling import raw_sign_cpu_us
from .harness import RunResult, admin, drive, progress, start_host, start_stack
from .profile import digest_request

# what docs/configuration.md calls the profiles (the first one sets the offered load of the open loops)
PROFILES: dict[str, dict[str, str]] = {
    "default": {},
    "latency": {"SIGNER_FRAME_MAX_REQUESTS": "32", "SIGNER_MAX_BATCH": "128"},
    "throughput": {"SIGNER_FRAME_MAX_REQUESTS": "512", "SIGNER_MAX_BATCH": "2000", "SIGNER_BATCH_WINDOW_US": "300"},
}


async def run_settings(
    out: Path,
    total: int = 30_000,
    open_seconds: float = 10.0,
    profiles: dict[str, dict[str, str]] | None = None,
    rounds: int = 2,
) -> dict[str, Any]:
    profiles = profiles or PROFILES
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    work = Path(tempfile.mkdtemp(prefix="signer-settings-"))
    progress("raw coincurve ceiling")
    before = raw_sign_cpu_us(1.0)
    entries = {name: {"env": env, "rounds": []} for name, env in profiles.items()}
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "requests": total, "rounds": rounds,
                              "profiles": entries}  # fmt: skip
    stack = await start_stack(work, enclaves=2)
    base: float | None = None
    try:
        host = await start_host(stack, enclaves=2)
        try:
            operator = admin(stack, host)
            for i in range(8):
                stack.keys.append(await operator.create_key("secp256k1", f"bench{i % 4}"))
            progress("warm-up")
            await drive(stack, host, "warm-up", max(total, 20_000), outstanding=4000, make=digest_request)
        finally:
            await host.process.astop()
        for r in range(rounds):
            for name, env in profiles.items():
                host = await start_host(stack, enclaves=2, env=env or None)
                try:
                    await drive(stack, host, "warm-up", 3000, outstanding=4000, make=digest_request)
                    label = f"{name} (round {r + 1})"
                    closed = await drive(stack, host, f"{label}: closed loop", total, outstanding=4000,
                                         make=digest_request)  # fmt: skip
                    base = base or closed.per_second
                    runs: dict[str, RunResult] = {"max": closed}
                    for point, rate in (("200/s", 200.0), ("50%", base * 0.5), ("80%", base * 0.8)):
                        n = max(50, int(rate * open_seconds))
                        name_ = f"{label}: open loop {point} ({rate:.0f}/s)"
                        runs[point] = await drive(stack, host, name_, n, rate=rate, make=digest_request, linger_ms=0,
                                                  separate=True)  # fmt: skip
                    report["profiles"][name]["rounds"].append({k: run.summary() for k, run in runs.items()})
                finally:
                    await host.process.astop()
    finally:
        await stack.close()
    print(file=sys.stderr)
    raw_us = (before + raw_sign_cpu_us(1.0)) / 2
    report["raw_sign_cpu_us"] = round(raw_us, 2)
    report["open_loop_rates"] = {"50%": round((base or 0) * 0.5), "80%": round((base or 0) * 0.8)}
    for entry in report["profiles"].values():
        entry["median"] = _median(entry["rounds"], raw_us)
    (out / "settings.json").write_text(json.dumps(report, indent=2))
    (out / "settings.md").write_text(markdown(report))
    return report


def _median(rounds: list[dict[str, Any]], raw_us: float) -> dict[str, Any]:
    """A profile's figures, each the median over its rounds."""

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    out: dict[str, Any] = {
        "per_second": round(med([r["max"]["per_second"] for r in rounds])),
        "host_cpu_over_raw_sign": med([r["max"]["host_cpu_us_per_request"] / raw_us for r in rounds]),
        "enclave_cpu_over_raw_sign": med([r["max"]["enclave_cpu_us_per_request"] / raw_us for r in rounds]),
    }
    for point in ("200/s", "50%", "80%"):
        out[point] = {q: med([r[point]["latency_ms"][q] for r in rounds]) for q in ("p50", "p99")}
    return out


def markdown(r: dict[str, Any]) -> str:
    rates = r["open_loop_rates"]
    lines = [
        "# Host settings compared (`python -m bench settings`)",
        "",
        f"Raw coincurve signature: {r['raw_sign_cpu_us']} us of CPU. Open loops at 200/s, {rates['50%']:,}/s and "
        f"{rates['80%']:,}/s (50% and 80% of the first profile's maximum in the first round) for every profile; "
        f"latency in ms from the intended send time. Each figure is the median of {r['rounds']} round(s).",
        "",
        "| profile | settings | max req/s | host CPU / raw sig | enclave CPU / raw sig | 200/s p50 / p99 "
        "| 50% p50 / p99 | 80% p50 / p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in r["profiles"].items():
        m = entry["median"]
        settings = ", ".join(f"{k}={v}" for k, v in entry["env"].items()) or "(defaults)"

        def lat(point: str, m: dict[str, Any] = m) -> str:
            return f"{m[point]['p50']} / {m[point]['p99']}"

        lines.append(
            f"| {name} | {settings} | {m['per_second']:,} | {m['host_cpu_over_raw_sign']}x | "
            f"{m['enclave_cpu_over_raw_sign']}x | {lat('200/s')} | {lat('50%')} | {lat('80%')} |"
        )
    return "\n".join(lines) + "\n"
