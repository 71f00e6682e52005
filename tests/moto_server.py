"""moto in server mode on an ephemeral loopback port: `python -m tests.moto_server` prints
`READY http://127.0.0.1:PORT` once it accepts connections (the readiness line every child process
of the project prints), and serves until SIGTERM. A real HTTP server: S3 and DynamoDB clients talk
to it as they would to AWS (it enforces S3 If-None-Match and DynamoDB ConditionExpression)."""

from __future__ import annotations

import signal
import sys
from typing import Any

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


def main() -> None:
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True)  # bound and listening before READY

    def stop(*_: Any) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"READY http://127.0.0.1:{server.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
