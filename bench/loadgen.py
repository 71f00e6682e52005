"""The open-loop producer of the benchmark, in a process of its own (`python -m bench.loadgen`).

So that sending never slows receiving (or the other way round), an open-loop run produces from
this process while the harness only consumes. Protocol on stdin/stdout: the harness writes the
keys (one JSON line), this process answers `READY` once its producer is up, the harness writes
the wall-clock start time t0 (one line), and request i is sent at t0 + i / rate. At the end it
prints `DONE <CPU seconds this process spent sending>`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import random
import sys
import time

from aiokafka import AIOKafkaProducer


async def produce(args: argparse.Namespace) -> None:
    module, name = args.make.split(":")
    make = getattr(importlib.import_module(module), name)
    keys = json.loads(sys.stdin.readline())
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=args.linger_ms)
    await producer.start()
    try:
        print("READY", flush=True)
        t0 = float(sys.stdin.readline())
        c0 = time.process_time()
        rnd = random.Random(7)
        for i in range(args.n):
            key, value = make(i, keys, rnd)
            delay = t0 + i / args.rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send(args.topic, value, key=key)
        await producer.flush()
        print(f"DONE {time.process_time() - c0}", flush=True)
    finally:
        await producer.stop()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("-n", type=int, required=True)
    ap.add_argument("--make", required=True, help="module:function making request i")
    ap.add_argument("--linger-ms", type=int, default=0)
    args = ap.parse_args()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]
    run(produce(args))


if __name__ == "__main__":
    main()
