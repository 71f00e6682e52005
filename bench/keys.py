"""`python -m bench keys`: a large key store - keys created per second, what the enclaves and a host hold,
a key's first signature when the enclave holds it and when it must be pushed, and a new host's start.

One run, one cluster: Kafka (the given one, or a local one started here), the dev KMS, two enclave
workers, the key store (`--keystore`, default a fresh compacted topic on that Kafka: kafka:///TOPIC).

1. Creation: `keys` keys through the real path - each `keys.create` operation signed by the dev
   operator for the enclave it goes to (each enclave's attestation is verified once), relayed by the
   host's enclave backend (`EnclaveBackend.handle`, in this process, over both enclaves, two
   connections each), sealed in the enclave, stored in the key store, loaded into the other enclave,
   and its receipt checked. `concurrency` operations at a time, each on a keyring of its own (the
   host serialises operations per keyring), keyrings alternating between the enclaves. Keys per
   second, and the CPU each process spent.
2. The enclaves' key caches after creation (records held and let go, RSS), under the enclaves'
   settings (ENCLAVE_MAX_KEYS etc., quoted in the report).
3. A new host's view: the store read into a fresh view in this process (seconds, keys).
4. Both enclaves restarted (empty), then a new `signer host` process on the store with
   SIGNER_PRELOAD_KEYS=`preload`: from its start to READY (view built, enclaves connected and given
   the preloaded keys, Kafka consumer up), then its first signature through Kafka.
5. First signatures through that host and Kafka, one request at a time, after one signature per
   keyring (so every keyring's data key is unwrapped): `sample` keys the enclave holds (preloaded)
   and `sample` keys it does not (pushed on demand after its `unknown_key`), p50/p99 of each.
6. RSS of the host and the enclaves at the end.

Written to --out (default artifacts/keys): keys.json, keys.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coincurve
import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.operations import NONCE_BYTES, packb
from signer.backend import EnclaveBackend
from signer.keystore import open_keystore, parse_url
from signer.operator import AttestedEnclave, OperatorKey, check_receipt
from signer.pool import PoolSettings
from signer.topology import Enclaves, HostProcess, Topology

from .harness import Stack, cpu_seconds, progress, rss_kb, start_host

# the enclave settings that bound its key cache, quoted in the report (their defaults unless set)
ENCLAVE_BOUNDS = {"ENCLAVE_MAX_KEYS": "100000", "ENCLAVE_MAX_KEY_BYTES": str(64 * 1024 * 1024),
                  "ENCLAVE_MAX_OPEN_KEYS": "20000"}  # fmt: skip


# how long each signed operation is valid: an enclave remembers at most 10,000 unexpired operations (replay
# protection) and refuses more (operation_busy), so at the CLI's 300 s it takes ~33 operations/s at most
VALIDITY_S = 10


@dataclass
class KeysProfile:
    keys: int = 100_000
    preload: int = 10_000  # SIGNER_PRELOAD_KEYS of the new host
    sample: int = 300  # first signatures measured, of held keys and of keys pushed on demand
    # keys.create operations at a time, each on its own keyring: an enclave takes at most 8 key operations in
    # flight on a connection, and each operation has one on its enclave and then one on the other (the new key)
    concurrency: int = 6


SMOKE = KeysProfile(keys=40, preload=10, sample=8, concurrency=6)


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    if not s:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    return {"p50": round(s[len(s) // 2] * 1000, 2), "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 2),
            "max": round(s[-1] * 1000, 2)}  # fmt: skip


async def _create(topology: Topology, backend: EnclaveBackend, p: KeysProfile) -> dict[str, Any]:
    """p.keys keys through the backend, p.concurrency at a time; what it cost."""
    assert topology.dev is not None
    session = topology.dev.admin(backend.handle)
    operators = [OperatorKey.load(topology.dev.operator_key_path)]
    ids = sorted({c.enclave_id for c in backend.pool.live()})
    attested: list[AttestedEnclave] = [await session.enclave(enclave_id=e) for e in ids]
    pids = {name: e.process.pid for name, e in topology.enclaves.items()}
    kafka_pid = topology.kafka.pid if topology.kafka is not None else None
    next_key = iter(range(p.keys))
    by_enclave: Counter[str] = Counter()
    created = 0
    t0 = time.perf_counter()
    cpu0 = (time.process_time(), {n: cpu_seconds(pid) for n, pid in pids.items()},
            cpu_seconds(kafka_pid) if kafka_pid else 0.0)  # fmt: skip

    async def worker(w: int) -> None:
        nonlocal created
        keyring, enclave = f"bk{w}", attested[w % len(attested)]
        for _ in next_key:
            args = {"keyring": keyring, "scheme": "secp256k1", "policy": None}
            body = {"op": "keys.create", "enclave": enclave.identity_raw, "nonce": secrets.token_bytes(NONCE_BYTES),
                    "expires_ms": int((time.time() + VALIDITY_S) * 1000), "args": args}  # fmt: skip
            raw = packb(body)
            reply = await backend.handle("keys.create", {"enclave_id": enclave.enclave_id, "keyring": keyring,
                                                         "operation": raw,
                                                         "approvals": [o.approve(raw) for o in operators]})  # fmt: skip
            vouched = check_receipt(enclave, "keys.create", raw, reply.get("receipt"))
            if vouched.get("keyring") != keyring:
                raise RuntimeError("a receipt for another keyring")
            created += 1
            by_enclave[str(reply.get("enclave_id"))] += 1
            if created % 500 == 0:
                rate = created / (time.perf_counter() - t0)
                progress(f"created {created:,}/{p.keys:,} keys ({rate:,.0f}/s)")

    async with asyncio.TaskGroup() as tg:
        for w in range(p.concurrency):
            tg.create_task(worker(w))
    seconds = time.perf_counter() - t0
    own = time.process_time() - cpu0[0]
    enclaves = {n: cpu_seconds(pid) - cpu0[1][n] for n, pid in pids.items()}
    broker = (cpu_seconds(kafka_pid) if kafka_pid else 0.0) - cpu0[2]
    return {"keys": created, "seconds": round(seconds, 1), "per_second": round(created / seconds, 1),
            "concurrency": p.concurrency, "keyrings": p.concurrency, "by_enclave": dict(by_enclave),
            "operation_validity_s": VALIDITY_S,
            "cpu_share_of_one_core": {"bench process (operator + host backend + key store)": round(own / seconds, 2),
                                      **{f"enclave {n}": round(c / seconds, 2) for n, c in enclaves.items()},
                                      "kafka broker": round(broker / seconds, 2)}}  # fmt: skip


async def _enclave_cache(backend: EnclaveBackend, topology: Topology) -> dict[str, Any]:
    """Each enclave's key cache as its next pong reports it, and its RSS."""
    conns = backend.pool.live()
    before = {c.name: c.enclave_stats for c in conns}
    async with asyncio.timeout(10):
        while any(c.enclave_stats is before[c.name] for c in conns):  # noqa: ASYNC110 - pongs set no event
            await asyncio.sleep(0.05)
    out: dict[str, Any] = {}
    for enclave_id, stats in backend.enclave_stats().items():
        proc = topology.enclaves[enclave_id].process
        out[enclave_id] = {"keys_held": stats["keys_loaded"], "key_bytes_mib": round(stats["key_bytes"] / 2**20, 1),
                           "keys_let_go": stats["keys_evicted"], "opened_keys": stats["keys_opened"],
                           "rss_mib": round(rss_kb(proc.pid) / 1024, 1)}  # fmt: skip
    return out


async def _view(url: str, bootstrap: str) -> dict[str, Any]:
    """The store read into a fresh view, as a new host does at start."""
    store = open_keystore(url, bootstrap=bootstrap, writer=False) if url.startswith("kafka:") else open_keystore(url)
    t0 = time.perf_counter()
    await store.start()
    seconds = time.perf_counter() - t0
    try:
        return {"keys": len(store.keys()), "keyrings": len(store.envelopes()), "seconds": round(seconds, 2)}
    finally:
        await store.close()


class _Client:
    """Sign requests to a host through Kafka, one at a time: produce, then wait for its result."""

    def __init__(self, bootstrap: str, host: HostProcess) -> None:
        self.layout = host.config.layout
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
        self.n = 0

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        tps = [TopicPartition(self.layout.results, p) for p in range(self.layout.result_partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)

    async def stop(self) -> None:
        await self.producer.stop()
        await self.consumer.stop()

    async def sign(self, key: dict[str, Any]) -> float:
        """Seconds from producing the request to reading its result; the signature is checked."""
        self.n += 1
        rid, digest = f"k{self.n}-{uuid.uuid4().hex[:6]}", os.urandom(32)
        body = {"v": 1, "request_id": rid, "key_id": key["key_id"], "scheme": "secp256k1_digest", "payload": digest}
        t0 = time.perf_counter()
        await self.producer.send_and_wait(self.layout.requests, msgpack.packb(body), key=key["key_id"].encode())
        async with asyncio.timeout(60):
            while True:
                for recs in (await self.consumer.getmany(timeout_ms=100)).values():
                    for rec in recs:
                        result = msgpack.unpackb(rec.value, raw=False)
                        if result.get("request_id") != rid:
                            continue
                        seconds = time.perf_counter() - t0
                        _check(key, digest, result)
                        return seconds


async def _restart_enclaves(topology: Topology, env: dict[str, str]) -> None:
    for name, enclave in list(topology.enclaves.items()):
        await enclave.process.astop()
        await topology.start_enclave(name, env=env)


Sign = Callable[[dict[str, Any]], Awaitable[float]]


async def _first_signatures(sign: Sign, keys: list[dict[str, Any]], p: KeysProfile, used: set[str]) -> dict[str, Any]:
    """After one signature per keyring (every keyring's data key unwrapped, from a preloaded key), the first
    signature of `p.sample` keys the enclaves were given at connect and of `p.sample` they were not (pushed
    on demand), interleaved so both see the same machine; keys are the store's, oldest first."""
    preloaded = keys[len(keys) - p.preload :] if p.preload else []
    cold = keys[: len(keys) - len(preloaded)]
    warm: dict[str, dict[str, Any]] = {}
    for k in reversed(preloaded):
        warm.setdefault(k["keyring"], k)
    for k in warm.values():
        await sign(k)
    used = used | {k["key_id"] for k in warm.values()}
    rnd = random.Random(7)
    unused = [k for k in preloaded if k["key_id"] not in used]
    held = rnd.sample(unused, min(p.sample, len(unused)))
    pushed = rnd.sample(cold, min(p.sample, len(cold)))
    progress(f"first signatures: {len(held)} held keys, {len(pushed)} keys pushed on demand")
    held_s, pushed_s = [], []
    for i in range(max(len(held), len(pushed))):
        if i < len(held):
            held_s.append(await sign(held[i]))
        if i < len(pushed):
            pushed_s.append(await sign(pushed[i]))
    return {"held_by_the_enclave": {"n": len(held_s), **_percentiles(held_s)},
            "pushed_on_demand": {"n": len(pushed_s), **_percentiles(pushed_s)}}  # fmt: skip


async def _backend_signatures(topology: Topology, keys: list[dict[str, Any]], p: KeysProfile) -> dict[str, Any]:
    """A host's enclave backend in this process (no Kafka) over the empty enclaves: its start (the store
    read, every connection given the envelopes and the preloaded keys), then first signatures."""
    urls = [e.url for e in topology.enclaves.values()]
    settings = PoolSettings(connections_per_enclave=2)
    t0 = time.perf_counter()
    backend = EnclaveBackend(urls, open_keystore(topology.keystore_url, bootstrap=topology.bootstrap), settings,
                             preload_keys=p.preload)  # fmt: skip
    try:
        await backend.start()
        viewed = time.perf_counter() - t0
        async with asyncio.timeout(120):
            while len(backend.pool.live()) < 2 * len(urls):  # noqa: ASYNC110 - the pool has no event for it
                await asyncio.sleep(0.01)
        live = time.perf_counter() - t0
        by_id = {k["key_id"]: k for k in keys}

        async def sign(key: dict[str, Any]) -> float:
            digest = os.urandom(32)
            body = {"v": 1, "request_id": uuid.uuid4().hex, "key_id": key["key_id"], "scheme": "secp256k1_digest",
                    "payload": digest}  # fmt: skip
            t = time.perf_counter()
            result = await backend.sign(key["key_id"], msgpack.packb(body))
            seconds = time.perf_counter() - t
            _check(by_id[key["key_id"]], digest, result)
            return seconds

        return {"start_s": round(viewed, 2), "all_connections_preloaded_s": round(live, 2),
                "first_signature_ms": await _first_signatures(sign, keys, p, set())}  # fmt: skip
    finally:
        await backend.close()


def _check(key: dict[str, Any], digest: bytes, result: dict[str, Any]) -> None:
    if result.get("status") != "ok":
        raise RuntimeError(f"{key['key_id']}: {result.get('error')}")
    signer = coincurve.PublicKey.from_signature_and_message(result["signature"], digest, hasher=None)
    if signer.format(False) != key["public_key"]:
        raise RuntimeError(f"{key['key_id']}: a signature by another key")


async def run_keys_bench(out: Path, p: KeysProfile, bootstrap: str = "", keystore: str = "",
                         enclave_env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    work = Path(tempfile.mkdtemp(prefix="signer-keys-"))
    url = keystore or f"kafka:///bench-keys-{uuid.uuid4().hex[:8]}"
    parse_url(url)  # a bad URL stops here, with its reason
    bounds = {**ENCLAVE_BOUNDS, **(enclave_env or {})}
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "profile": p.__dict__,
                              "keystore": url.split("?")[0], "enclave_settings": bounds}  # fmt: skip
    topology = Topology(work, sock_dir=work, log_level="WARNING", bootstrap=bootstrap, keystore=url)
    stack = Stack(topology)
    try:
        if not bootstrap:
            progress("starting Kafka")
            await topology.start_kafka()
        await topology.start_kms()
        await topology.provision()
        await topology.start_enclaves(Enclaves(count=2, prefix="enc", env=bounds))
        settings = PoolSettings(connections_per_enclave=2)
        backend = await topology.start_backend(settings)  # returns once one connection is up
        async with asyncio.timeout(60):  # creations go through every enclave: wait for all of them
            # the pool has no event for "every enclave up": its state is polled
            while len({c.enclave_id for c in backend.pool.live()}) < len(topology.enclaves):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        progress(f"creating {p.keys:,} keys")
        report["creation"] = await _create(topology, backend, p)
        report["enclaves_after_creation"] = await _enclave_cache(backend, topology)
        stored = sorted(backend.store.keys(), key=lambda k: k.created_ms)
        keys: list[dict[str, Any]] = [
            {"key_id": k.key_id, "keyring": k.keyring_id, "public_key": k.public_key} for k in stored
        ]
        await backend.close()
        topology.backends.remove(backend)

        progress("reading the store into a fresh view")
        report["view"] = await _view(url, topology.bootstrap)
        report["view"]["bench_process_rss_mib"] = round(rss_kb(os.getpid()) / 1024, 1)

        progress("restarting the enclaves (empty): a host's enclave backend in this process")
        await _restart_enclaves(topology, bounds)
        report["backend"] = await _backend_signatures(topology, keys, p)

        progress("restarting the enclaves (empty), starting a new host")
        await _restart_enclaves(topology, bounds)
        t0 = time.perf_counter()
        host = await start_host(stack, enclaves=2, env={"SIGNER_PRELOAD_KEYS": str(p.preload)})
        ready = time.perf_counter() - t0
        client = _Client(topology.bootstrap, host)
        await client.start()
        try:
            first = await client.sign(keys[-1])  # the newest key: preloaded unless SIGNER_PRELOAD_KEYS=0
            report["new_host"] = {"preload_keys": p.preload, "start_to_ready_s": round(ready, 2),
                                  "ready_to_first_signature_s": round(first, 3),
                                  "start_to_first_signature_s": round(ready + first, 2),
                                  "rss_mib_at_ready": round(rss_kb(host.process.pid) / 1024, 1)}  # fmt: skip
            report["first_signature_ms"] = await _first_signatures(client.sign, keys, p, {keys[-1]["key_id"]})
            report["new_host"]["rss_mib_at_end"] = round(rss_kb(host.process.pid) / 1024, 1)
            report["enclaves_at_end"] = {
                name: {"rss_mib": round(rss_kb(e.process.pid) / 1024, 1)} for name, e in topology.enclaves.items()
            }
        finally:
            await client.stop()
            await host.process.astop()
    finally:
        await stack.close()
    print(file=sys.stderr)
    (out / "keys.json").write_text(json.dumps(report, indent=2))
    (out / "keys.md").write_text(markdown(report))
    return report


def markdown(r: dict[str, Any]) -> str:
    c, v, h, f, b = r["creation"], r["view"], r["new_host"], r["first_signature_ms"], r["backend"]
    settings = ", ".join(f"{k}={int(v):,}" for k, v in r["enclave_settings"].items())
    lines = [
        "# A large key store (`python -m bench keys`)",
        "",
        f"{c['keys']:,} keys in `{r['keystore']}`, two enclave workers ({settings}), "
        f"{r['machine']['cpus']} CPUs shared by every process.",
        "",
        f"- keys created: **{c['per_second']:,}/s** ({c['keys']:,} in {c['seconds']:,} s, {c['concurrency']} "
        f"operations at a time on {c['keyrings']} keyrings, each signed by the operator, valid for "
        f"{c['operation_validity_s']} s, and its receipt checked)",
        "- CPU during creation, share of one core: "
        + ", ".join(f"{name} {share}" for name, share in c["cpu_share_of_one_core"].items()),
        f"- a fresh view of the store: {v['keys']:,} keys in {v['keyrings']} keyrings read in **{v['seconds']} s**",
        f"- a new host (SIGNER_PRELOAD_KEYS={h['preload_keys']:,}), enclaves empty: start to READY "
        f"**{h['start_to_ready_s']} s**, then its first signature through Kafka {h['ready_to_first_signature_s']} s "
        f"(**{h['start_to_first_signature_s']} s** from start)",
        f"- host RSS: {h['rss_mib_at_ready']} MiB at READY, {h['rss_mib_at_end']} MiB at the end",
        f"- a host's enclave backend in-process over the restarted (empty) enclaves: store read "
        f"{b['start_s']} s, every connection given the envelopes and the preloaded keys "
        f"{b['all_connections_preloaded_s']} s after its start",
        "",
        "First signature of a key, one request at a time, once every keyring's data key is unwrapped (from a "
        "preloaded key): a key the enclave holds (preloaded) and one it does not (the enclave answers "
        "`unknown_key`, the host pushes the key from its view and asks again):",
        "",
        "| path | key | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for path, q in (("the host's enclave backend (no Kafka)", b["first_signature_ms"]),
                    ("through Kafka and a `signer host` process", f)):  # fmt: skip
        for name, kind in (("held", "held_by_the_enclave"), ("pushed on demand", "pushed_on_demand")):
            x = q[kind]
            lines.append(f"| {path} | {name} | {x['n']} | {x['p50']} | {x['p99']} | {x['max']} |")
    lines += [
        "",
        "Enclaves after creation (each got every key: the one that created it, or the host's push):",
        "",
        "| enclave | keys held | record MiB | let go | opened keys | RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in r["enclaves_after_creation"].items():
        lines.append(f"| {name} | {e['keys_held']:,} | {e['key_bytes_mib']} | {e['keys_let_go']:,} | "
                     f"{e['opened_keys']:,} | {e['rss_mib']} |")  # fmt: skip
    ends = ", ".join(f"{n} {e['rss_mib']} MiB" for n, e in r["enclaves_at_end"].items())
    lines += ["", f"Enclaves after the new host's run (restarted empty, preloaded, then the samples): RSS {ends}.", ""]
    return "\n".join(lines)
