"""Draw the Grafana dashboard's panels from a live Prometheus, as one PNG.

Grafana is not installable everywhere (it is not in Debian's archive); this renders the
same PromQL (deploy/grafana/dashboards/signer.json) through Prometheus's HTTP API:

    python deploy/plot_dashboard.py --prometheus http://127.0.0.1:9090 --out dashboard.png
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).parent / "grafana" / "dashboards" / "signer.json"


def panel_queries(dashboard: dict[str, Any], rate_interval: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(panel title, [(expr, legendFormat), ...])] with Grafana's $__rate_interval substituted."""
    out = []
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            continue
        targets = [
            (t["expr"].replace("$__rate_interval", rate_interval), t.get("legendFormat", "")) for t in p["targets"]
        ]
        out.append((p["title"], targets))
    return out


def query(
    prometheus: str, expr: str, start: float | None = None, end: float | None = None, step: float = 1.0
) -> list[dict[str, Any]]:
    if start is None:
        url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    else:
        params = {"query": expr, "start": start, "end": end, "step": step}
        url = f"{prometheus}/api/v1/query_range?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return list(body["data"]["result"])


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def render(prometheus: str, out: Path, minutes: float, rate_interval: str, dashboard_path: Path = DASHBOARD) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(dashboard_path.read_text())
    panels = panel_queries(dashboard, rate_interval)
    end = time.time()
    start = end - minutes * 60
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(18, 3.2 * rows), squeeze=False)
    drawn = 0
    for ax, (title, targets) in zip(axes.flat, panels, strict=False):
        for expr, fmt in targets:
            for series in query(prometheus, expr, start, end, step=max(1.0, minutes * 60 / 300)):
                xs = [float(t) - end for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(fmt, series["metric"])[:40])
                drawn += 1
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']} - last {minutes:g} min (seconds before now)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return drawn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--out", type=Path, default=Path("dashboard.png"))
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--rate-interval", default="1m")
    args = ap.parse_args()
    n = render(args.prometheus, args.out, args.minutes, args.rate_interval)
    print(f"{args.out}: {n} series")


if __name__ == "__main__":
    main()
