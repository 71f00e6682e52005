"""A real single-node Apache Kafka (KRaft) for development and tests.

The broker is provisioned from Maven Central jars (no tarball download): the
runtime classpath of ``org.apache.kafka:kafka_2.13`` is copied by Maven's
``dependency:copy-dependencies`` into a cache directory once, then started the
way the official ``bin/kafka-storage.sh`` and ``bin/kafka-server-start.sh``
start it (main classes ``kafka.tools.StorageTool`` and ``kafka.Kafka``, the JVM
flags of ``kafka-run-class.sh``, log4j2 configured from a properties file).

Readiness is a real signal: an ApiVersions request answered without error on
the broker's port, not merely an open port.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

# Pinned. aiokafka 0.14 was run publicly against Kafka 4.0.x (produce, consume,
# commits); this project's integration tests cover idempotence and transactions.
KAFKA_VERSION = "4.0.2"

DOCKER_ALTERNATIVE = "or run `docker compose up kafka` and set KAFKA_BOOTSTRAP=127.0.0.1:9092"


class _PortTaken(Exception):
    """The broker lost the race for a port picked a moment before."""


class KafkaUnavailable(RuntimeError):
    """The local broker cannot be provisioned or started; the message says why in one line."""


def default_cache_dir() -> Path:
    env = os.environ.get("SIGNER_KAFKA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "enclave-signer" / "kafka"


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _require_tool(name: str, what: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KafkaUnavailable(
            f"{name} not found on PATH: the local Kafka needs {what} "
            f"(Debian: apt-get install openjdk-17-jre-headless maven), {DOCKER_ALTERNATIVE}"
        )
    return path


def provision(version: str = KAFKA_VERSION, cache_dir: Path | None = None) -> Path:
    """Resolve Kafka's runtime jars with Maven into the cache; return the libs directory.

    Idempotent and safe to call from concurrent processes (a file lock guards it).
    """
    _require_tool("java", "Java 17+")
    cache = (cache_dir or default_cache_dir()) / version
    libs = cache / "libs"
    done = cache / ".complete"
    if done.exists():
        return libs
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return libs
        mvn = _require_tool("mvn", "Maven to fetch its jars from Maven Central")
        pom_text = resources.files("broker").joinpath("kafka/pom.xml").read_text()
        pom = cache / "pom.xml"
        pom.write_text(pom_text.replace("@KAFKA_VERSION@", version))
        if libs.exists():
            shutil.rmtree(libs)
        cmd = [
            mvn, "-q", "-B", "-f", str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise KafkaUnavailable(
                f"Maven could not resolve org.apache.kafka:kafka_2.13:{version} "
                f"({' | '.join(tail)}), {DOCKER_ALTERNATIVE}"
            )
        done.write_text(version + "\n")
    return libs


def api_versions_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when the broker answers an ApiVersions (v0) request with error_code 0."""
    client_id = b"signer-ready"
    # request header v1: api_key, api_version, correlation_id, client_id (int16-prefixed)
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exact(s, 4)
            (size,) = struct.unpack(">i", head)
            resp = _recv_exact(s, size)
    except OSError:
        return False
    if len(resp) < 6:
        return False
    correlation_id, error_code = struct.unpack(">ih", resp[:6])
    return correlation_id == 7 and error_code == 0


def new_cluster_id() -> str:
    """A Kafka cluster id: base64url of 16 random bytes. Like Kafka's Uuid.randomUuid(),
    never one that starts with "-" (the storage tool's argument parser reads it as an option)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


@dataclass
class LocalKafka:
    """A single combined broker+controller node on loopback, owned by this object (by pid)."""

    data_dir: Path | None = None
    port: int | None = None
    version: str = KAFKA_VERSION
    heap: str = "512m"
    host: str = "127.0.0.1"
    cache_dir: Path | None = None
    start_timeout: float = 120.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_dir: bool = field(default=False, init=False, repr=False)
    _controller_port: int = field(default=0, init=False, repr=False)
    startup_seconds: float = field(default=0.0, init=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "logs" / "server.log"

    def start(self) -> LocalKafka:
        """Provision, format, start and wait until ready. Ports are picked free just before
        the JVM binds them; if another process takes one in between, try other ports."""
        fixed_port = self.port is not None
        for attempt in range(3):
            try:
                return self._start_once()
            except _PortTaken:
                if fixed_port or attempt == 2:
                    raise KafkaUnavailable(f"kafka could not bind its ports: {self._log_tail()}") from None
                self.port = None
                self._controller_port = 0
                # the storage was formatted for the old controller port: format again
                assert self.data_dir is not None
                shutil.rmtree(self.data_dir / "kraft-logs", ignore_errors=True)
        raise AssertionError("unreachable")

    def _start_once(self) -> LocalKafka:
        libs = provision(self.version, self.cache_dir)
        t0 = time.monotonic()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="signer-kafka-"))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        self.port = self.port or free_port(self.host)
        # kept across restarts: the storage was formatted with this controller endpoint
        self._controller_port = self._controller_port or free_port(self.host)
        props = self.data_dir / "server.properties"
        props.write_text(self._server_properties())
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(resources.files("broker").joinpath("kafka/log4j2.properties").read_text())
        java = self._java_cmd(libs, log4j)
        meta = self.data_dir / "kraft-logs" / "meta.properties"
        if not meta.exists():
            cluster_id = new_cluster_id()
            fmt = subprocess.run(
                [*java, "kafka.tools.StorageTool", "format", "--standalone",
                 "-t", cluster_id, "-c", str(props)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if fmt.returncode != 0:
                raise KafkaUnavailable(f"kafka storage format failed: {fmt.stderr.strip()[-400:]}")
        out = open(self.data_dir / "logs" / "kafkaServer.out", "ab")
        try:
            self._proc = subprocess.Popen(
                [*java, "kafka.Kafka", str(props)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            out.close()
        deadline = time.monotonic() + self.start_timeout
        while not api_versions_ok(self.host, self.port):
            if self._proc.poll() is not None:
                if self._logs_contain("Address already in use"):
                    self._proc = None
                    raise _PortTaken()
                raise KafkaUnavailable(
                    f"kafka exited with {self._proc.returncode} during start-up; "
                    f"see {self.data_dir / 'logs'}: {self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise KafkaUnavailable(f"kafka not ready after {self.start_timeout:.0f}s")
            time.sleep(0.1)  # poll interval of the readiness probe, not a readiness assumption
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the broker we started (by pid), SIGKILL it if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _java_cmd(self, libs: Path, log4j: Path) -> list[str]:
        assert self.data_dir is not None
        java = _require_tool("java", "Java 17+")
        return [
            java, f"-Xms{self.heap}", f"-Xmx{self.heap}",
            "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp", f"{libs}/*",
        ]  # fmt: skip

    def _server_properties(self) -> str:
        assert self.data_dir is not None
        h, p, c = self.host, self.port, self._controller_port
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.bootstrap.servers={h}:{c}",
                f"listeners=PLAINTEXT://{h}:{p},CONTROLLER://{h}:{c}",
                f"advertised.listeners=PLAINTEXT://{h}:{p},CONTROLLER://{h}:{c}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={self.data_dir / 'kraft-logs'}",
                "num.partitions=1",
                "auto.create.topics.enable=false",
                # one node: internal topics must not ask for three replicas
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=4",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=4",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                # abort a dead producer's open transaction within ~a second of its timeout (default 10 s)
                "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
                "",
            ]
        )

    def _logs(self) -> list[str]:
        lines: list[str] = []
        for name in ("server.log", "kafkaServer.out"):
            with contextlib.suppress(OSError, TypeError):
                lines += (self.data_dir / "logs" / name).read_text(errors="replace").splitlines()  # type: ignore[operator]
        return lines

    def _logs_contain(self, text: str) -> bool:
        return any(text in line for line in self._logs())

    def _log_tail(self) -> str:
        """The broker's last error lines, for one-line error messages."""
        errors = [line for line in self._logs() if " ERROR " in line or "Exception" in line]
        return " | ".join(errors[-3:])[-1500:]
