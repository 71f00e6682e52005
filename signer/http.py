"""/metrics, /healthz and /readyz for one host worker (aiohttp)."""

from __future__ import annotations

import errno
import socket

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import ConfigError
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
            "enclave": any(c.credits > 0 for c in host.backend.pool.live()),
        }
        return web.json_response(
            {"ready": all(checks.values()), "checks": checks}, status=200 if all(checks.values()) else 503
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def listen_socket(bind: str, port: int) -> socket.socket:
    """The endpoints' listening socket, bound now (before anything else starts): an address in use
    is one line naming SIGNER_HTTP_PORT, not a traceback once everything else is up."""
    try:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        return socket.create_server((bind, port), family=family)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"SIGNER_HTTP_PORT={port}: {bind}:{port} is already in use (another signer on this machine?); "
                "set SIGNER_HTTP_PORT to a free port, or 0 for any"
            ) from None
        raise ConfigError(f"SIGNER_HTTP_HOST={bind} SIGNER_HTTP_PORT={port}: cannot listen: {exc.strerror}") from None


async def serve_http(
    host: HostWorker, bind: str, port: int, sock: socket.socket | None = None
) -> tuple[web.AppRunner, int]:
    """Start the HTTP endpoints (on `sock` if given, from listen_socket); returns the runner (to clean
    up) and the bound port."""
    runner = web.AppRunner(make_app(host), access_log=None)
    await runner.setup()
    site: web.BaseSite = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, bind, port)
    await site.start()
    # with port 0 the OS picks one: read it back from the listening socket
    sockets = getattr(site._server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
