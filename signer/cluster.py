"""A whole local cluster in one place: Kafka (unless KAFKA_BOOTSTRAP is set), the dev KMS,
enclave worker processes on Unix sockets standing in for vsock, and a host worker.

Used by `python -m signer up` and `python -m signer demo`. State that must survive a
restart (the dev KMS's keys and PKI, the wrapped keyrings) lives in a data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
from aiohttp import web

from broker.local_kafka import LocalKafka
from broker.topics import ensure_topics

from .config import HostConfig
from .host import HostWorker
from .http import serve_http

if TYPE_CHECKING:
    from devkms.local import DevEnclave

    from .operator import AdminSession

log = structlog.get_logger("cluster")


class ChildProcess:
    """A `python -m MODULE` child, owned by pid; ready when it prints its READY line."""

    def __init__(self, module: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.module = module
        self.args = args
        self.env = env
        self.ready_line = ""
        self.ready_prefix = b"READY"
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, *self.args,
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
        )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
            while line and not line.startswith(self.ready_prefix) and self.ready_prefix != b"READY":
                line = await self.proc.stdout.readline()  # e.g. a host prints other lines first
        if not line.startswith(self.ready_prefix):
            await self.stop()
            raise RuntimeError(f"{self.module} {' '.join(self.args)} did not start: {line!r}")
        self.ready_line = line.decode().strip()
        # keep reading stdout so the child never blocks on a full pipe
        self._drain = asyncio.create_task(self._drain_stdout())

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain


class LocalCluster:
    def __init__(
        self,
        http_port: int | None = None,
        partitions: int | None = None,
        enclave_processes: int | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="signer-cluster-"))
        self.data_dir = data_dir or self.workdir / "data"
        self.kafka: LocalKafka | None = None
        self.devkms: ChildProcess | None = None
        self.kms_endpoint = ""
        self.dev: DevEnclave | None = None
        # signing is CPU-bound under the GIL: one enclave worker process per core by default
        self.enclave_processes = enclave_processes or int(
            os.environ.get("SIGNER_ENCLAVE_PROCESSES", str(os.cpu_count() or 1))
        )
        self.enclaves: list[ChildProcess] = []
        self.host: HostWorker | None = None
        self.config: HostConfig | None = None
        self.http_port = 0
        self._http_port_req = http_port
        self._partitions = partitions
        self._run: asyncio.Task[None] | None = None
        self._http: web.AppRunner | None = None

    @property
    def bootstrap(self) -> str:
        assert self.config is not None
        return self.config.bootstrap

    async def __aenter__(self) -> LocalCluster:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _start(self) -> None:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "")
        if not bootstrap:
            self.kafka = LocalKafka(data_dir=self.workdir / "kafka")
            await asyncio.to_thread(self.kafka.start)
            bootstrap = self.kafka.bootstrap
            log.info("kafka_ready", bootstrap=bootstrap, startup_s=round(self.kafka.startup_seconds, 2))
        enclave_env = await self._start_kms()
        urls = [f"unix://{self.workdir / f'enclave-{i}.sock'}" for i in range(self.enclave_processes)]
        overrides: dict[str, object] = {
            "bootstrap": bootstrap,
            "enclaves": urls,
            "keystore_dir": str(self.data_dir / "keystore"),
        }
        cfg = HostConfig.from_env(**overrides)
        if self._partitions:
            from dataclasses import replace

            cfg.layout = replace(cfg.layout, request_partitions=self._partitions)
        if self._http_port_req is not None:
            cfg.http_port = self._http_port_req
        self.config = cfg
        await ensure_topics(bootstrap, cfg.layout)
        for i, url in enumerate(urls):
            args = ["--listen", url, "--enclave-id", f"enclave-{i}"]
            self.enclaves.append(ChildProcess("enclave_worker", args, enclave_env))
            await self.enclaves[-1].start()
        self.host = HostWorker(cfg)
        await self.host.start()
        self._http, self.http_port = await serve_http(self.host, cfg.http_host, cfg.http_port)
        self._run = asyncio.create_task(self.host.run(), name="host-worker")

    async def _start_kms(self) -> dict[str, str]:
        """Start the dev KMS; provision the dev enclave configuration, operator key and keyring KMS key."""
        from devkms.local import provision_dev_enclave

        self.data_dir.mkdir(parents=True, exist_ok=True)
        kms_dir = self.data_dir / "devkms"
        self.devkms = ChildProcess("devkms", ["--data-dir", str(kms_dir)])
        await self.devkms.start()
        self.kms_endpoint = self.devkms.ready_line.split()[1]
        state_path = self.data_dir / "cluster.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        # one keyring KMS key for the data dir; its policy follows the enclave code's measurement
        self.dev = await provision_dev_enclave(self.kms_endpoint, kms_dir, self.data_dir, state.get("kms_key_arn"))
        if state.get("pcr0") not in (None, self.dev.pcr0):
            log.warning("enclave_measurement_changed", old_pcr0=state["pcr0"], new_pcr0=self.dev.pcr0,
                        note="the dev keyring KMS key now releases data keys to the new measurement only")  # fmt: skip
        state_path.write_text(json.dumps({"kms_key_arn": self.dev.kms_key_arn, "pcr0": self.dev.pcr0}))
        return self.dev.env

    def admin(self) -> AdminSession:
        """An operator session (the dev operator key) over this cluster's Kafka admin topic."""
        from .admin_client import admin_call

        assert self.dev is not None and self.config is not None
        bootstrap, layout = self.config.bootstrap, self.config.layout

        async def call(op: str, args: dict[str, Any]) -> dict[str, Any]:
            return await admin_call(bootstrap, op, args, layout)

        return cast("AdminSession", self.dev.admin(call))

    async def wait(self) -> None:
        """Return when the host worker's loop ends (it re-raises the loop's failure)."""
        assert self._run is not None
        await asyncio.shield(self._run)  # a cancelled waiter must not cancel the host loop itself

    async def aclose(self) -> None:
        # shutdown order: stop fetching and drain the host, then the enclave, then Kafka
        if self.host is not None and self._run is not None:
            await self.host.stop_within(self._run, self.config.shutdown_timeout_s if self.config else 30.0)
            self._run = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        for enclave in self.enclaves:
            await enclave.stop()
        self.enclaves = []
        if self.devkms is not None:
            await self.devkms.stop()
            self.devkms = None
        if self.kafka is not None:
            await asyncio.to_thread(self.kafka.stop)
            self.kafka = None
        shutil.rmtree(self.workdir, ignore_errors=True)
