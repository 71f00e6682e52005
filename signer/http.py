"""/metrics, /healthz and /readyz for one host worker (aiohttp)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .host import HostWorker


def make_app(host: HostWorker) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(host.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        checks = {
            "kafka": host.kafka_ready,
            "enclave": any(c.credits > 0 for c in host.pool.live()),
        }
        return web.json_response(
            {"ready": all(checks.values()), "checks": checks}, status=200 if all(checks.values()) else 503
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve_http(host: HostWorker, bind: str, port: int) -> tuple[web.AppRunner, int]:
    """Start the HTTP endpoints; returns the runner (to clean up) and the bound port."""
    runner = web.AppRunner(make_app(host), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, bind, port)
    await site.start()
    # with port 0 the OS picks one: read it back from the listening socket
    sockets = getattr(site._server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
