"""python -m enclave_worker --listen unix:///tmp/enclave.sock [--enclave-id ID]"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

from schemas.logs import configure_logging
from schemas.transport import TransportUrlError, parse_channel_url

from .server import EnclaveServer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="enclave_worker", description="Serve signing frames.")
    ap.add_argument("--listen", default=os.environ.get("ENCLAVE_LISTEN", "vsock://4294967295:5000"),
                    help="vsock://CID:PORT, unix:///path or tcp://host:port")  # fmt: skip
    ap.add_argument("--enclave-id", default=os.environ.get("ENCLAVE_ID", socket.gethostname()))
    ap.add_argument("--credits", type=int, default=int(os.environ.get("ENCLAVE_CREDITS", "4096")))
    args = ap.parse_args(argv)
    try:
        parse_channel_url(args.listen)
    except TransportUrlError as exc:
        print(f"enclave_worker: {exc}", file=sys.stderr)
        return 2
    configure_logging("enclave_worker")
    asyncio.run(_run(args.listen, args.enclave_id, args.credits))
    return 0


async def _run(url: str, enclave_id: str, credits: int) -> None:
    server = EnclaveServer(url, enclave_id, credits)
    await server.start()
    # readiness signal for the process that started us: one line on stdout
    print(f"READY {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serve = asyncio.create_task(server.serve_forever())
    await stop.wait()
    serve.cancel()
    await server.close()


if __name__ == "__main__":
    sys.exit(main())
