"""python -m enclave_worker --listen unix:///tmp/enclave.sock [--enclave-id ID]"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    ap.add_argument("--credits", type=int, default=int(os.environ.get("ENCLAVE_CREDITS", "4096")),
                    help="requests the host may have in flight per connection")  # fmt: skip
    ap.add_argument("--handler", choices=["sign", "noop"], default=os.environ.get("ENCLAVE_HANDLER", "sign"),
                    help="noop: answer without signing (channel benchmarks and tests only)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        parse_channel_url(args.listen)
    except TransportUrlError as exc:
        print(f"enclave_worker: {exc}", file=sys.stderr)
        return 2
    configure_logging("enclave_worker")
    if args.credits < 1:
        print("enclave_worker: --credits must be at least 1", file=sys.stderr)
        return 2
    asyncio.run(_run(args.listen, args.enclave_id, args.credits, args.handler))
    return 0


async def _run(url: str, enclave_id: str, credits: int, handler: str) -> None:
    server = EnclaveServer(url, enclave_id, credits, handler)
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
    with contextlib.suppress(asyncio.CancelledError):
        await serve
    await server.close()


if __name__ == "__main__":
    sys.exit(main())
