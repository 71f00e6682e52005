"""python -m devkms --data-dir DIR [--port 0]: run the dev KMS; prints `READY http://HOST:PORT`."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from .local import DEV_ACCESS_KEY_ID, DEV_SECRET_ACCESS_KEY
from .server import DevKms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devkms", description="Development KMS (AWS KMS JSON protocol subset)")
    ap.add_argument("--data-dir", type=Path, required=True, help="key material, policies and the dev PKI live here")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=int(os.environ.get("DEVKMS_PORT", "0")))
    ap.add_argument("--region", default=os.environ.get("SIGNER_KMS_REGION", "us-east-1"))
    args = ap.parse_args(argv)
    akid = os.environ.get("SIGNER_KMS_ACCESS_KEY_ID", DEV_ACCESS_KEY_ID)
    secret = os.environ.get("SIGNER_KMS_SECRET_ACCESS_KEY", DEV_SECRET_ACCESS_KEY)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    kms = DevKms(args.data_dir, args.region, {akid: secret})
    asyncio.run(_serve(kms, args.host, args.port))
    return 0


async def _serve(kms: DevKms, host: str, port: int) -> None:
    runner = web.AppRunner(kms.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    print(f"READY http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
