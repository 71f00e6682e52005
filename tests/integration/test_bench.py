"""The benchmark harness's smoke configuration: it runs end to end and its report is complete.
(A check that the harness works, not a timed test: no number is asserted beyond being measured.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_smoke_report_is_complete(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "SIGNER_"))}
    out = subprocess.run(
        [sys.executable, "-m", "bench", "report", "--smoke", "--out", str(tmp_path)],
        env={**env, "PYTHONPATH": str(ROOT), "SIGNER_LOG_LEVEL": "WARNING"},
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for field in ("raw_sign_per_second_one_core", "max_per_second", "efficiency", "speedup_over_reference"):
        assert report[field] > 0, field
    assert report["reference"]["per_second"] > 0
    names = [r["name"] for r in report["runs"]]
    assert names[0] == "closed loop (max)" and any(n.startswith("open loop 50%") for n in names)
    for run in report["runs"]:
        assert run["requests"] > 0 and set(run["latency_ms"]) == {"p50", "p90", "p99", "p99.9"}
        assert run["statuses"].get("ok", 0) == run["requests"]  # every request id matched, every one signed
        assert run["host_cpu_us_per_request"] > 0 and run["enclave_cpu_us_per_request"] > 0
        assert set(run["stage_ms_per_request"]) >= {"kafka_wait", "channel_transfer", "enclave_service"}
    assert len(report["sweeps"]) == 2 and all(s["largest_stage"] for s in report["sweeps"])
    md = (tmp_path / "report.md").read_text()
    assert "speed-up" in md and "## Sweeps" in md
    for png in ("throughput.png", "latency_cdf.png", "stages.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png


def test_gateway_bench_smoke_answers_every_call_once(tmp_path: Path, bootstrap: str) -> None:
    """`python -m bench gateway --smoke` on the session's Kafka: both paths measured, every call answered once."""
    _smoke("gateway", bootstrap, tmp_path, timeout=300)
    report = json.loads((tmp_path / "gateway.json").read_text())
    overhead, load = report["overhead"], report["load"]
    assert overhead["gateway"]["calls"] == overhead["kafka"]["requests"] == 40  # 20/s for 2 s on each path
    assert overhead["gateway"]["failures"] == overhead["kafka"]["failures"] == 0
    assert overhead["gateway"]["latency_ms"]["p50"] > 0 and overhead["kafka"]["latency_ms"]["p50"] > 0
    assert load["calls"] > 0 and load["every_call_answered_once"], load
    assert load["statuses"] == {"200 ok": load["calls"]} and load["gateway_rss_mib"]["max"] > 0
    assert report["bad_signatures"] == 0
    assert "added by the gateway" in (tmp_path / "gateway.md").read_text()


def test_keys_bench_smoke_measures_every_figure(tmp_path: Path, bootstrap: str) -> None:
    """`python -m bench keys --smoke` on the session's Kafka: 40 keys created through the enclaves, a view
    read, a new host started, first signatures of held keys and of keys pushed on demand, all measured."""
    _smoke("keys", bootstrap, tmp_path, timeout=120)
    report = json.loads((tmp_path / "keys.json").read_text())
    assert report["creation"]["keys"] == 40 and report["creation"]["per_second"] > 0
    assert set(report["creation"]["by_enclave"]) == {"enc0", "enc1"}  # created through both enclaves
    assert report["view"]["keys"] == 40 and report["view"]["keyrings"] == 6
    assert report["new_host"]["start_to_first_signature_s"] > 0 and report["new_host"]["rss_mib_at_end"] > 0
    for sampled in (report["first_signature_ms"], report["backend"]["first_signature_ms"]):
        assert sampled["held_by_the_enclave"]["n"] >= 1  # 10 preloaded, less one per keyring used to warm up
        assert sampled["pushed_on_demand"]["n"] == 8 and sampled["pushed_on_demand"]["p50"] > 0
    assert all(e["keys_held"] == 40 for e in report["enclaves_after_creation"].values())
    assert "pushed on demand" in (tmp_path / "keys.md").read_text()


def _smoke(mode: str, bootstrap: str, out: Path, timeout: float) -> None:
    """`python -m bench MODE --smoke` on the session's Kafka, writing to `out`; it must exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "SIGNER_"))}
    done = subprocess.run(
        [sys.executable, "-m", "bench", mode, "--smoke", "--bootstrap", bootstrap, "--out", str(out)],
        env={**env, "PYTHONPATH": str(ROOT), "SIGNER_LOG_LEVEL": "WARNING"},
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
