"""moto in server mode on an ephemeral loopback port: `python -m tests.moto_server` prints
`READY http://127.0.0.1:PORT` once it accepts connections (the readiness line every child process
of the project prints), and serves until SIGTERM. A real HTTP server: S3 and DynamoDB clients talk
to it as they would to AWS (it enforces S3 If-None-Match and DynamoDB ConditionExpression)."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True)  # bound and listening before READY

    def stop(*_: Any) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"READY http://127.0.0.1:{server.port}", flush=True)
    server.serve_forever()


def aws_client(service: str, endpoint: str) -> Any:
    """A plain botocore client on the moto server (test credentials, us-east-1)."""
    import botocore.session

    return botocore.session.get_session().create_client(
        service, region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )  # fmt: skip


AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def create_table(endpoint: str, table: str) -> None:
    """A key store table as docs/keystore.md describes it: partition key pk (S)."""
    aws_client("dynamodb", endpoint).create_table(
        TableName=table, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST",
    )  # fmt: skip


if __name__ == "__main__":
    main()
