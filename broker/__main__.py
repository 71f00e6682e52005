"""python -m broker topics --bootstrap HOST:PORT [--partitions 12]: create the topic layout (idempotent).
python -m broker kafka [--port 9092]: run the local Kafka (KRaft, Maven Central jars) in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys

from .local_kafka import KafkaUnavailable, LocalKafka
from .topics import TopicLayout, ensure_topics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m broker")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("topics", help="create sign.requests, sign.results, sign.dlq, sign.admin(.replies)")
    t.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    t.add_argument("--partitions", type=int, default=int(os.environ.get("SIGNER_REQUEST_PARTITIONS", "12")))
    t.add_argument("--replication-factor", type=int, default=1)
    t.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the broker")
    k = sub.add_parser("kafka", help="run the local single-node Kafka until interrupted")
    k.add_argument("--port", type=int, default=9092)
    args = ap.parse_args(argv)
    if args.cmd == "topics":
        layout = dataclasses.replace(TopicLayout(), request_partitions=args.partitions,
                                     replication_factor=args.replication_factor)  # fmt: skip
        try:
            asyncio.run(ensure_topics(args.bootstrap, layout, timeout=args.timeout))
        except TimeoutError:
            print(f"broker: no Kafka answered at {args.bootstrap} within {args.timeout:.0f}s", file=sys.stderr)
            return 2
        print(f"topics ready on {args.bootstrap}")
        return 0
    try:
        kafka = LocalKafka(port=args.port).start()
    except KafkaUnavailable as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    print(f"KAFKA_BOOTSTRAP={kafka.bootstrap}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        kafka.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
