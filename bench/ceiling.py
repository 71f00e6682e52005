"""The raw signing ceiling: coincurve signatures per second on one core."""

from __future__ import annotations

import os
import time

import coincurve


def raw_sign_rate(seconds: float = 1.0) -> float:
    key = coincurve.PrivateKey()
    digests = [os.urandom(32) for _ in range(1000)]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for d in digests:
            key.sign_recoverable(d, hasher=None)
        n += len(digests)
    return n / (time.perf_counter() - t0)


def raw_sign_cpu_us(seconds: float = 1.0) -> float:
    """CPU time (this thread's, not wall time) per coincurve signature: steadier than a rate on a
    shared machine, and what the processes' CPU per request compares with."""
    key = coincurve.PrivateKey()
    digests = [os.urandom(32) for _ in range(1000)]
    n, t0, c0 = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds:
        for d in digests:
            key.sign_recoverable(d, hasher=None)
        n += len(digests)
    return (time.thread_time() - c0) / n * 1e6
