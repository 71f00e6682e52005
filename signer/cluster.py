"""A whole local cluster in one place: Kafka (unless KAFKA_BOOTSTRAP is set; one node, or a
LocalKafkaCluster of `brokers` nodes), the dev KMS, enclave worker processes on Unix sockets
standing in for vsock, and a host worker in-process.

Used by `python -m signer up` and `python -m signer demo`; built with signer/topology.py. The
wrapped keyrings live in the key store, by default the compacted topic sign.keys on the cluster's
Kafka (SIGNER_KEYSTORE chooses another). State that must survive a restart (the dev KMS's keys and
PKI) lives in a data directory, which one cluster at a time may use (a lock file in it).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from broker.topics import replication_factor_for

from .config import HostConfig
from .http import listen_socket
from .topology import Enclaves, LocalHost, Topology

if TYPE_CHECKING:
    import socket

    from broker.kafka_cluster import LocalKafkaCluster
    from devkms.local import DevEnclave

    from .host import HostWorker
    from .operator import AdminSession

log = structlog.get_logger("cluster")


class ClusterError(RuntimeError):
    """The local cluster cannot start; the message says why in one line."""


class DataDirLock:
    """An exclusive lock on DATA_DIR/cluster.lock for as long as a cluster uses the directory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "cluster.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise ClusterError(
                f"SIGNER_DATA_DIR={self.path.parent} is in use by another local cluster{by}: stop it, "
                "or set SIGNER_DATA_DIR to another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays
            self._fd = None


def _keystore(settings: HostConfig) -> str:
    """SIGNER_KEYSTORE (or the deprecated SIGNER_KEYSTORE_DIR) if set, else kafka://: the cluster's
    own Kafka, the store a cluster of hosts shares."""
    from .config import load_config_file

    path = os.environ.get("SIGNER_CONFIG_FILE")
    chosen = {**(load_config_file(path) if path else {}), **os.environ}
    if chosen.get("SIGNER_KEYSTORE") or chosen.get("SIGNER_KEYSTORE_DIR"):
        return settings.keystore
    return "kafka://"


class LocalCluster:
    def __init__(
        self,
        http_port: int | None = None,
        partitions: int | None = None,
        enclave_processes: int | None = None,
        data_dir: Path | None = None,
        brokers: int = 1,
    ) -> None:
        if brokers < 1:
            raise ClusterError(f"--brokers {brokers}: a Kafka cluster needs at least one broker")
        self.brokers = brokers
        # with brokers > 1: the LocalKafkaCluster this cluster started (a single node is the topology's)
        self.kafka_cluster: LocalKafkaCluster | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="signer-cluster-"))
        self.data_dir = data_dir or self.workdir / "data"
        # signing is CPU-bound under the GIL: one enclave worker process per core by default
        self.enclave_processes = enclave_processes or int(
            os.environ.get("SIGNER_ENCLAVE_PROCESSES", str(os.cpu_count() or 1))
        )
        self.topology = Topology(self.data_dir, sock_dir=self.workdir)
        self.config: HostConfig | None = None
        self.http_port = 0
        self._http_port_req = http_port
        self._partitions = partitions
        self._lock = DataDirLock(self.data_dir)
        self._local: LocalHost | None = None
        self.gateway_url = ""
        self.gateway_token = ""

    @property
    def bootstrap(self) -> str:
        assert self.config is not None
        return self.config.bootstrap

    @property
    def dev(self) -> DevEnclave | None:
        return self.topology.dev

    @property
    def host(self) -> HostWorker | None:
        return self._local.worker if self._local is not None else None

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
        # what can collide with another cluster on this machine is checked before anything starts
        self._lock.acquire()
        settings = HostConfig.from_env()  # a bad setting is one line now, not after Kafka started
        self.topology.keystore = _keystore(settings)
        port = settings.http_port if self._http_port_req is None else self._http_port_req
        http_socket = listen_socket(settings.http_host, port)
        try:
            await self._start_parts(http_socket)  # the host's HTTP server takes the socket over
        except BaseException:
            http_socket.close()
            raise

    async def _start_parts(self, http_socket: socket.socket) -> None:
        topo = self.topology
        topo.bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "")
        if topo.bootstrap and self.brokers > 1:
            raise ClusterError(f"--brokers {self.brokers} starts a local Kafka, but KAFKA_BOOTSTRAP is set: "
                               "unset it, or leave out --brokers")  # fmt: skip
        if not topo.bootstrap:
            startup_s = await self._start_kafka()
            log.info("kafka_ready", bootstrap=topo.bootstrap, brokers=self.brokers, startup_s=round(startup_s, 2))
        await self._start_kms()
        await topo.start_enclaves(Enclaves(count=self.enclave_processes, prefix="enclave-"))
        cfg = topo.host_config(http_port=http_socket.getsockname()[1])
        if self._partitions:
            cfg.layout = replace(cfg.layout, request_partitions=self._partitions)
        if self.kafka_cluster is not None and cfg.layout.replication_factor is None:
            # min(3, brokers) replicas (min.insync.replicas=2 with three), whatever the metadata lists yet
            cfg.layout = replace(cfg.layout, replication_factor=replication_factor_for(self.brokers))
        self.config = cfg
        self._local = await topo.start_local_host(cfg, http_socket)
        self.http_port = self._local.port
        await self._serving(cfg)
        await self._start_gateway()

    async def _start_gateway(self) -> None:
        """One HTTP gateway (a `signer gateway` process) with a dev client whose bearer token is kept
        in DATA_DIR/gateway-token (created once, mode 0600)."""
        import hashlib
        import secrets

        token_path = self.data_dir / "gateway-token"
        if not token_path.exists():
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        self.gateway_token = token_path.read_text().strip()
        clients = self.data_dir / "gateway-clients.json"
        digest = hashlib.sha256(self.gateway_token.encode()).hexdigest()
        clients.write_text(json.dumps({"dev": {"token_sha256": digest}}))
        settings = {"SIGNER_GATEWAY_CLIENTS": str(clients), "SIGNER_GATEWAY_METRICS_PUBLIC": "true",
                    "SIGNER_GATEWAY_PORT": os.environ.get("SIGNER_GATEWAY_PORT", "0")}  # fmt: skip
        gateway = await self.topology.start_gateway(settings=settings)
        self.gateway_url = gateway.address

    async def _start_kafka(self) -> float:
        """Kafka in the work directory: the topology's single node, or a LocalKafkaCluster of `brokers`
        nodes (stopped in aclose, after everything else). Its start-up time in seconds."""
        topo = self.topology
        if self.brokers == 1:
            await topo.start_kafka(self.workdir / "kafka")
            assert topo.kafka is not None
            return topo.kafka.startup_seconds
        from broker.kafka_cluster import LocalKafkaCluster

        self.kafka_cluster = LocalKafkaCluster(brokers=self.brokers, data_dir=self.workdir / "kafka")
        await asyncio.to_thread(self.kafka_cluster.start)  # stops the nodes it started if it fails
        topo.bootstrap = self.kafka_cluster.bootstrap
        return self.kafka_cluster.startup_seconds

    async def _start_kms(self) -> None:
        """Start the dev KMS; provision the dev enclave configuration, operator key and keyring KMS key."""
        await self.topology.start_kms()
        state_path = self.data_dir / "cluster.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        # one keyring KMS key for the data dir; its policy follows the enclave code's measurement
        dev = await self.topology.provision(state.get("kms_key_arn"), out_dir=self.data_dir)
        if state.get("pcr0") not in (None, dev.pcr0):
            log.warning("enclave_measurement_changed", old_pcr0=state["pcr0"], new_pcr0=dev.pcr0,
                        note="the dev keyring KMS key now releases data keys to the new measurement only")  # fmt: skip
        state_path.write_text(json.dumps({"kms_key_arn": dev.kms_key_arn, "pcr0": dev.pcr0}))

    async def _serving(self, cfg: HostConfig) -> None:
        """Return once the host consumes from Kafka and holds a live connection to every enclave."""
        host = self.host
        assert host is not None
        try:
            async with asyncio.timeout(cfg.enclave_wait_s):
                while not (host.kafka_ready and all(host.backend.pool.live(url) for url in cfg.enclaves)):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        except TimeoutError:
            down = [url for url in cfg.enclaves if not host.backend.pool.live(url)]
            raise ClusterError(
                f"the host worker did not reach {'Kafka' if not host.kafka_ready else ', '.join(down)} within "
                f"{cfg.enclave_wait_s} s (SIGNER_ENCLAVE_WAIT_S)"
            ) from None

    def admin(self) -> AdminSession:
        """An operator session (the dev operator key) over this cluster's Kafka admin topic."""
        assert self.config is not None
        return self.topology.operator(self.config.layout)

    async def wait(self) -> None:
        """Return when the host worker's loop ends (it re-raises the loop's failure)."""
        assert self._local is not None
        await self._local.wait()

    async def aclose(self) -> None:
        # shutdown order: stop fetching and drain the host, then the enclaves, the dev KMS, Kafka
        try:
            await self.topology.aclose()
        finally:
            if self.kafka_cluster is not None:
                await asyncio.to_thread(self.kafka_cluster.stop)
                self.kafka_cluster = None
            self._local = None
            self._lock.release()
            shutil.rmtree(self.workdir, ignore_errors=True)
