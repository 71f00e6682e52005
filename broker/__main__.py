"""python -m broker topics --bootstrap HOST:PORT [--partitions 12]: create the topic layout and the
key store's compacted topic (idempotent).
python -m broker kafka [--port 9092]: run the local Kafka (KRaft, Maven Central jars) in the foreground.
python -m broker kafka --brokers 3 [--port 9092]: a three-node cluster (client ports 9092-9094; 0: any)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys

from .kafka_cluster import LocalKafkaCluster
from .local_kafka import KafkaUnavailable, LocalKafka
from .topics import TopicLayout, ensure_keys_topic, ensure_topics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m broker")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("topics", help="create sign.requests, sign.results, sign.dlq, sign.admin(.replies), sign.keys")
    t.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    t.add_argument("--partitions", type=int, default=int(os.environ.get("SIGNER_REQUEST_PARTITIONS", "12")))
    t.add_argument("--replication-factor", type=int, default=None, help="default: min(3, brokers)")
    t.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the broker")
    t.add_argument("--keys-topic", default="sign.keys", help="the kafka:// key store's topic ('': none)")
    k = sub.add_parser("kafka", help="run the local Kafka (one node, or --brokers N) until interrupted")
    k.add_argument("--port", type=int, default=9092, help="client port (of node 1 with --brokers; 0: any free port)")
    k.add_argument("--brokers", type=int, default=1, help="nodes, each a broker and controller (default 1)")
    args = ap.parse_args(argv)
    if args.cmd == "topics":
        layout = dataclasses.replace(TopicLayout(), request_partitions=args.partitions,
                                     replication_factor=args.replication_factor)  # fmt: skip
        try:
            asyncio.run(ensure_topics(args.bootstrap, layout, timeout=args.timeout))
            if args.keys_topic:
                asyncio.run(ensure_keys_topic(args.bootstrap, args.keys_topic, timeout=args.timeout,
                                              replication_factor=args.replication_factor))  # fmt: skip
        except TimeoutError:
            print(f"broker: no Kafka answered at {args.bootstrap} within {args.timeout:.0f}s", file=sys.stderr)
            return 2
        print(f"topics ready on {args.bootstrap}")
        return 0
    if args.brokers < 1:
        ap.error("--brokers must be at least 1")
    return _run_kafka(args.port, args.brokers)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_kafka(port: int, brokers: int) -> int:
    """Run Kafka until SIGINT or SIGTERM, then stop every node it started (also when the
    signal comes during start-up)."""
    kafka: LocalKafka | LocalKafkaCluster
    if brokers == 1:
        kafka = LocalKafka(port=port or None)  # 0: any free port
    else:
        ports = [port + i for i in range(brokers)] if port else None
        kafka = LocalKafkaCluster(brokers=brokers, ports=ports)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        kafka.start()
        print(f"KAFKA_BOOTSTRAP={kafka.bootstrap}", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0
    except KafkaUnavailable as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        kafka.stop()


if __name__ == "__main__":
    sys.exit(main())
