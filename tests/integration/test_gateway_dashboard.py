"""The gateway's Grafana dashboard (deploy/grafana/dashboards/gateway.json) against a real Prometheus
scraping a gateway under load: every panel's expression returns data, and the panels are drawn."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import re
import time
import uuid
from pathlib import Path

import aiohttp

from broker.topics import TopicLayout
from tests.conftest import ROOT, topology
from tests.integration.test_observability import RATE, Prometheus

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "gateway.json"


def _exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"].replace("$__rate_interval", RATE))
            for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]  # fmt: skip


def test_the_gateway_dashboard_uses_only_metrics_the_catalogue_lists() -> None:
    catalogue = (ROOT / "docs" / "metrics.md").read_text()
    for title, expr in _exprs():
        for name in set(re.findall(r"signer_gateway_\w+", expr)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert f"`{base}`" in catalogue, (title, name)


async def test_every_gateway_panel_has_data_under_load(
    bootstrap: str, layout: TopicLayout, sock_dir: Path, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    clients = tmp_path / "clients.json"
    clients.write_text(json.dumps({"dash": {"token_sha256": hashlib.sha256(token.encode()).hexdigest()}}))
    topo = topology(tmp_path, sock_dir, bootstrap, layout)
    prom = None
    try:
        await topo.start_kms()
        await topo.provision()
        await topo.start_enclave("enclave-dash")
        await topo.start_host()
        key = await topo.operator().create_key("secp256k1", "default")
        gw = await topo.start_gateway(settings={"SIGNER_GATEWAY_CLIENTS": str(clients),
                                                "SIGNER_GATEWAY_METRICS_PUBLIC": "true"})  # fmt: skip
        prom = Prometheus(tmp_path, gw.address.removeprefix("http://"))
        url = gw.address
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:

            async def call(i: int) -> int:
                if i % 10 == 3:  # an unknown token: 401 unauthorized
                    async with http.get(f"{url}/v1/keys", headers={"Authorization": "Bearer nope"}) as r:
                        return r.status
                if i % 10 == 7:  # invalid input: 400 invalid_payload
                    body = {"key_id": key["key_id"], "scheme": "secp256k1_digest", "payload": "0x00"}
                    async with http.post(f"{url}/v1/sign", json=body) as r:
                        return r.status
                if i % 10 == 9:
                    rpc = {"jsonrpc": "2.0", "id": i, "method": "eth_accounts"}
                    async with http.post(url, json=rpc) as r:
                        return r.status
                body = {"key_id": key["key_id"], "scheme": "secp256k1_digest", "payload": "0x" + os.urandom(32).hex()}
                async with http.post(f"{url}/v1/sign", json=body) as r:
                    assert (await r.json())["status"] == "ok"
                    return r.status

            # about 10 s of load, 20 calls at a time, until Prometheus has scraped enough for every rate()
            deadline, i = time.monotonic() + 10, 0
            while time.monotonic() < deadline:
                await asyncio.gather(*(call(i + j) for j in range(20)))
                i += 20
                await asyncio.sleep(0.05)
        empty = [(title, e) for title, e in _exprs() if not prom.query(e)["data"]["result"]]
        assert not empty, f"gateway dashboard expressions without data: {empty}"
        codes = {r["metric"]["code"] for r in prom.query(f"sum by (code) (rate(signer_gateway_errors_total[{RATE}]))")
                 ["data"]["result"]}  # fmt: skip
        assert {"unauthorized", "invalid_payload"} <= codes, codes
        spec = importlib.util.spec_from_file_location("plot_dashboard", ROOT / "deploy" / "plot_dashboard.py")
        plot = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(plot)  # type: ignore[union-attr]
        png = Path(os.environ.get("SIGNER_GATEWAY_DASHBOARD_PNG", tmp_path / "gateway-dashboard.png"))
        drawn = plot.render(prom.url, png, minutes=0.5, rate_interval=RATE, dashboard_path=DASHBOARD)
        assert drawn >= len({title for title, _ in _exprs()}) and png.stat().st_size > 10_000  # series drawn
    finally:
        if prom is not None:
            prom.stop()
        await topo.aclose()
