"""Observability against a real Prometheus (Debian's `prometheus`, started here on loopback)
scraping a running cluster under load: every dashboard and alert expression returns data,
and with one enclave's link slowed down, the bottleneck panel names channel transfer for it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from broker.local_kafka import free_port
from broker.topics import TopicLayout
from signer.pool import _score
from signer.topology import Topology
from tests.conftest import ROOT, topology

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "signer.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RATE = "15s"


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    assert shutil.which("promtool"), "promtool is installed by bin/setup (Debian package prometheus)"
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(["promtool", "check", "config", str(RULES.parent / "prometheus.yml")],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)],
                  "scrape_configs": [{"job_name": "signer", "static_configs": [{"targets": [target]}]}]}  # fmt: skip
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # readiness: /-/ready answers 200
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-800:]}")
            time.sleep(0.1)

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            return dict(json.load(r))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"].replace("$__rate_interval", RATE))
            for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]  # fmt: skip


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


@pytest.fixture
async def cluster(bootstrap: str, layout: TopicLayout, tmp_path: Path, sock_dir: Path) -> AsyncIterator[Topology]:
    c = topology(tmp_path, sock_dir, bootstrap, layout)
    try:
        yield c
    finally:
        await c.aclose()


async def test_dashboard_and_alerts_return_data_and_the_slow_link_is_named(
    bootstrap: str, layout: TopicLayout, tmp_path: Path, cluster: Topology
) -> None:
    await cluster.start_kms()
    await cluster.provision()
    fast = await cluster.start_enclave("fast")
    slow = await cluster.start_enclave("slow", link="?latency_ms=30")  # the emulated vsock link to it is slow
    fast_url, slow_url = fast.url, slow.url
    port = (await cluster.start_host(timeout=90)).port
    prom = Prometheus(tmp_path, f"127.0.0.1:{port}")
    try:
        # keyrings chosen so that both enclaves own some (rendezvous hashing, as the pool does it)
        rings = [f"ring{i}" for i in range(40)]
        slow_rings = [r for r in rings if max((fast_url, slow_url), key=lambda u: _score(r, u)) == slow_url][:3]
        fast_rings = [
            r
            for r in rings
            if r not in slow_rings and max((fast_url, slow_url), key=lambda u: _score(r, u)) == fast_url
        ][:3]
        operator = cluster.operator()
        keys = [await operator.create_key("secp256k1", r) for r in slow_rings + fast_rings]
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        await producer.start()
        try:
            deadline = time.monotonic() + 14
            i = 0
            while time.monotonic() < deadline:  # bounded load: ~14 s at a few hundred requests per second
                for _ in range(40):
                    i += 1
                    key_id = keys[i % len(keys)]["key_id"] if i % 20 else "k_unknown"
                    req = {"v": 1, "request_id": f"o{i}", "key_id": key_id, "scheme": "secp256k1_digest",
                           "payload": os.urandom(32)}  # fmt: skip
                    value = msgpack.packb(req) if i % 50 else b"\xc1garbage"
                    await producer.send(layout.requests, value, key=key_id.encode())
                await asyncio.sleep(0.1)
            await producer.flush()
        finally:
            await producer.stop()
        # every panel's expression and every alert's signal has data; alert expressions evaluate
        empty = [(title, e) for title, e in dashboard_exprs() if not prom.query(e)["data"]["result"]]
        assert not empty, f"dashboard expressions without data: {empty}"
        for rule in rules():
            assert prom.query(rule["expr"])["status"] == "success", rule["alert"]
            assert prom.query(rule["annotations"]["signal"])["data"]["result"], rule["alert"]
        # the bottleneck panel: for the enclave behind the slow link, channel transfer is the largest stage
        bottleneck = next(e for title, e in dashboard_exprs() if title.startswith("Largest stage per enclave"))
        largest = {r["metric"]["enclave"]: r["metric"]["stage"] for r in prom.query(bottleneck)["data"]["result"]}
        assert largest["slow"] == "channel_transfer", largest
        per_stage = prom.query(f'sum by (stage) (rate(signer_channel_stage_seconds_sum{{enclave="slow"}}[{RATE}]))')
        shares = {r["metric"]["stage"]: float(r["value"][1]) for r in per_stage["data"]["result"]}
        assert max(shares, key=shares.get) == "channel_transfer", shares  # type: ignore[arg-type]
        # the dashboard drawn from the live data
        import importlib.util

        spec = importlib.util.spec_from_file_location("plot_dashboard", ROOT / "deploy" / "plot_dashboard.py")
        plot = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(plot)  # type: ignore[union-attr]
        png = Path(os.environ.get("SIGNER_DASHBOARD_PNG", tmp_path / "dashboard.png"))
        drawn = plot.render(prom.url, png, minutes=0.5, rate_interval=RATE)
        assert drawn >= 20 and png.stat().st_size > 20_000
    finally:
        prom.stop()
