"""A real single-node Apache Kafka (KRaft) for development and tests.

The broker is provisioned from Maven Central jars (no tarball download): the
runtime classpath of ``org.apache.kafka:kafka_2.13`` is copied by Maven's
``dependency:copy-dependencies`` into a cache directory once, then started the
way the official ``bin/kafka-storage.sh`` and ``bin/kafka-server-start.sh``
start it (main classes ``kafka.tools.StorageTool`` and ``kafka.Kafka``, the JVM
flags of ``kafka-run-class.sh``, log4j2 configured from a properties file).

Readiness is a real signal: an ApiVersions request answered without error on
the broker's port, not merely an open port.

What a node's configuration, storage format, JVM and logs take is shared with
broker/kafka_cluster.py, which runs N such nodes as one cluster; so are the
Metadata and DescribeQuorum probes.
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
from collections.abc import Sequence
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


def _exchange(host: str, port: int, body: bytes, timeout: float) -> bytes | None:
    """Send one size-prefixed Kafka request and read its response; None when there is no answer."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exact(s, 4))
            return _recv_exact(s, size)
    except OSError:
        return None


def api_versions_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when the broker answers an ApiVersions (v0) request with error_code 0."""
    client_id = b"signer-ready"
    # request header v1: api_key, api_version, correlation_id, client_id (int16-prefixed)
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    resp = _exchange(host, port, body, timeout)
    if resp is None or len(resp) < 6:
        return False
    correlation_id, error_code = struct.unpack(">ih", resp[:6])
    return correlation_id == 7 and error_code == 0


@dataclass(frozen=True)
class PartitionState:
    leader: int  # node id, -1 while there is none
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass(frozen=True)
class ClusterMetadata:
    """One broker's view of the cluster, from a Metadata (v1) answer."""

    brokers: dict[int, tuple[str, int]]  # node id -> (host, port) of the live (unfenced) brokers
    controller_id: int  # -1 when the broker knows of none
    topics: dict[str, dict[int, PartitionState]]  # only the topics asked for that exist


def metadata(host: str, port: int, topics: Sequence[str] | None = (), timeout: float = 2.0) -> ClusterMetadata | None:
    """Ask one broker for its Metadata (v1): brokers, controller and the given topics (None: all
    topics, () none). None when it does not answer."""
    client_id = b"signer-ready"
    body = struct.pack(">hhih", 3, 1, 11, len(client_id)) + client_id
    if topics is None:
        body += struct.pack(">i", -1)
    else:
        body += struct.pack(">i", len(topics))
        for name in topics:
            raw = name.encode()
            body += struct.pack(">h", len(raw)) + raw
    resp = _exchange(host, port, body, timeout)
    if resp is None:
        return None
    try:
        return parse_metadata_v1(resp, correlation_id=11)
    except (struct.error, ValueError, UnicodeDecodeError):
        return None


def parse_metadata_v1(resp: bytes, correlation_id: int) -> ClusterMetadata:
    """Decode a Metadata v1 response (response header v0 included: the correlation id)."""
    r = _Reader(resp)
    if r.take(">i")[0] != correlation_id:
        raise ValueError("correlation id mismatch")
    brokers: dict[int, tuple[str, int]] = {}
    for _ in range(r.take(">i")[0]):
        (node_id,) = r.take(">i")
        bhost = r.string() or ""
        (bport,) = r.take(">i")
        r.string(nullable=True)  # rack
        brokers[node_id] = (bhost, bport)
    (controller_id,) = r.take(">i")
    topics: dict[str, dict[int, PartitionState]] = {}
    for _ in range(r.take(">i")[0]):
        (error_code,) = r.take(">h")
        name = r.string() or ""
        r.take(">?")  # is_internal
        partitions: dict[int, PartitionState] = {}
        for _ in range(r.take(">i")[0]):
            _error, index, leader = r.take(">hii")
            partitions[index] = PartitionState(leader, r.int32s(), r.int32s())
        if error_code == 0:
            topics[name] = partitions
    r.end()
    return ClusterMetadata(brokers, controller_id, topics)


@dataclass(frozen=True)
class QuorumState:
    """The KRaft controller quorum, from a DescribeQuorum (v0) answer."""

    leader_id: int  # the active controller, -1 while there is none
    leader_epoch: int
    voters: tuple[int, ...]
    observers: tuple[int, ...]


def describe_quorum(host: str, port: int, timeout: float = 2.0) -> QuorumState | None:
    """Ask a broker (which forwards it to the active controller) for the state of the metadata
    quorum. None when there is no answer or the answer is an error."""
    client_id = b"signer-ready"
    topic = b"__cluster_metadata"
    # request header v2 (tagged fields), then the flexible body: topics[name, partitions[index]]
    body = struct.pack(">hhih", 55, 0, 13, len(client_id)) + client_id + b"\x00"
    body += b"\x02" + _uvarint(len(topic) + 1) + topic + b"\x02" + struct.pack(">i", 0) + b"\x00\x00\x00"
    resp = _exchange(host, port, body, timeout)
    if resp is None:
        return None
    try:
        return parse_describe_quorum_v0(resp, correlation_id=13)
    except (struct.error, ValueError, UnicodeDecodeError):
        return None


def parse_describe_quorum_v0(resp: bytes, correlation_id: int) -> QuorumState | None:
    """Decode a DescribeQuorum v0 response (response header v1 included); None on an error code."""
    r = _Reader(resp)
    if r.take(">i")[0] != correlation_id:
        raise ValueError("correlation id mismatch")
    r.tagged()
    if r.take(">h")[0] != 0:
        return None
    state: QuorumState | None = None
    for _ in range(r.uvarint() - 1):
        r.compact_string()
        for _ in range(r.uvarint() - 1):
            _index, error_code, leader_id, epoch, _hw = r.take(">ihiiq")
            replicas: list[tuple[int, ...]] = []
            for _ in range(2):  # current voters, observers
                ids = []
                for _ in range(r.uvarint() - 1):
                    ids.append(r.take(">iq")[0])
                    r.tagged()
                replicas.append(tuple(ids))
            r.tagged()
            if error_code == 0:
                state = QuorumState(leader_id, epoch, replicas[0], replicas[1])
        r.tagged()
    r.tagged()
    r.end()
    return state


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    """Kafka protocol primitives over one response buffer."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> tuple[int, ...]:
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError("truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def uvarint(self) -> int:
        shift = value = 0
        while True:
            byte = self.raw(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 28:
                raise ValueError("varint too long")

    def string(self, nullable: bool = False) -> str | None:
        (n,) = self.take(">h")
        if n < 0:
            if nullable:
                return None
            raise ValueError("null string")
        return self.raw(n).decode()

    def compact_string(self) -> str | None:
        n = self.uvarint()
        return None if n == 0 else self.raw(n - 1).decode()

    def int32s(self) -> tuple[int, ...]:
        (n,) = self.take(">i")
        return self.take(f">{max(n, 0)}i")

    def tagged(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()  # tag
            self.raw(self.uvarint())

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ValueError("trailing bytes")


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


# -- what a single node and a cluster share: configuration, storage, the JVM, logs ---------------


def server_properties(
    *,
    node_id: int,
    host: str,
    port: int,
    controller_port: int,
    log_dir: Path,
    quorum: str,
    nodes: int = 1,
    extra: dict[str, str] | None = None,
) -> str:
    """server.properties of one combined broker+controller node of a cluster of `nodes`.

    `quorum` is the controller quorum line (controller.quorum.bootstrap.servers=... for a single
    node formatted --standalone, controller.quorum.voters=... for a static quorum). Replication of
    the internal topics follows the cluster size: min(3, nodes) replicas, and with three or more
    nodes two in-sync replicas are required (so one node may be down without stopping writes)."""
    rf = min(3, nodes)
    min_isr = 2 if nodes >= 3 else 1
    lines = [
        "process.roles=broker,controller",
        f"node.id={node_id}",
        quorum,
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={log_dir}",
        "num.partitions=1",
        "auto.create.topics.enable=false",
    ]
    if nodes == 1:
        lines += [
            # one node: internal topics must not ask for three replicas
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
        ]
    else:
        lines += [
            f"default.replication.factor={rf}",
            f"min.insync.replicas={min_isr}",
            "unclean.leader.election.enable=false",
            f"offsets.topic.replication.factor={rf}",
            "offsets.topic.num.partitions=4",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={min_isr}",
            "transaction.state.log.num.partitions=4",
            f"share.coordinator.state.topic.replication.factor={rf}",
            f"share.coordinator.state.topic.min.isr={min_isr}",
        ]
    lines += [
        "group.initial.rebalance.delay.ms=0",
        # abort a dead producer's open transaction within ~a second of its timeout (default 10 s)
        "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
    ]
    lines += [f"{k}={v}" for k, v in (extra or {}).items()]
    return "\n".join([*lines, ""])


def java_command(libs: Path, logs_dir: Path, log4j: Path, heap: str, options: Sequence[str] = ()) -> list[str]:
    """The JVM command line of kafka-run-class.sh (heap fixed at `heap`), up to the main class."""
    java = _require_tool("java", "Java 17+")
    return [
        java, f"-Xms{heap}", f"-Xmx{heap}",
        "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
        *options,
        "-Djava.awt.headless=true",
        f"-Dkafka.logs.dir={logs_dir}",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp", f"{libs}/*",
    ]  # fmt: skip


def write_node_files(data_dir: Path, properties: str) -> tuple[Path, Path]:
    """server.properties and log4j2.properties in data_dir (and its logs/ directory)."""
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    props = data_dir / "server.properties"
    props.write_text(properties)
    log4j = data_dir / "log4j2.properties"
    log4j.write_text(resources.files("broker").joinpath("kafka/log4j2.properties").read_text())
    return props, log4j


def format_command(java: list[str], props: Path, cluster_id: str, *options: str) -> list[str]:
    """kafka-storage format of one node's storage (run it only on storage not yet formatted)."""
    return [*java, "kafka.tools.StorageTool", "format", *options, "-t", cluster_id, "-c", str(props)]


def spawn_node(java: list[str], props: Path, logs_dir: Path) -> subprocess.Popen[bytes]:
    """Start kafka.Kafka in a session of its own, its stdout appended to logs/kafkaServer.out."""
    out = open(logs_dir / "kafkaServer.out", "ab")
    try:
        return subprocess.Popen(
            [*java, "kafka.Kafka", str(props)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    finally:
        out.close()


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM one process we started (by pid), SIGKILL it if it does not exit in time; reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def node_logs(logs_dir: Path | None) -> list[str]:
    lines: list[str] = []
    for name in ("server.log", "kafkaServer.out"):
        with contextlib.suppress(OSError):
            if logs_dir is not None:
                lines += (logs_dir / name).read_text(errors="replace").splitlines()
    return lines


def log_tail(logs_dir: Path | None) -> str:
    """A node's last error lines, for one-line error messages."""
    errors = [line for line in node_logs(logs_dir) if " ERROR " in line or "Exception" in line]
    return " | ".join(errors[-3:])[-1500:]


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
        self.port = self.port or free_port(self.host)
        # kept across restarts: the storage was formatted with this controller endpoint
        self._controller_port = self._controller_port or free_port(self.host)
        props, log4j = write_node_files(self.data_dir, self._server_properties())
        java = self._java_cmd(libs, log4j)
        meta = self.data_dir / "kraft-logs" / "meta.properties"
        if not meta.exists():
            fmt = subprocess.run(format_command(java, props, new_cluster_id(), "--standalone"),
                                 capture_output=True, text=True, check=False)  # fmt: skip
            if fmt.returncode != 0:
                raise KafkaUnavailable(f"kafka storage format failed: {fmt.stderr.strip()[-400:]}")
        self._proc = spawn_node(java, props, self.data_dir / "logs")
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
        if proc is not None:
            terminate(proc, timeout)
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _java_cmd(self, libs: Path, log4j: Path) -> list[str]:
        assert self.data_dir is not None
        return java_command(libs, self.data_dir / "logs", log4j, self.heap)

    def _server_properties(self) -> str:
        assert self.data_dir is not None
        h, c = self.host, self._controller_port
        assert self.port is not None
        return server_properties(node_id=1, host=h, port=self.port, controller_port=c,
                                 log_dir=self.data_dir / "kraft-logs",
                                 quorum=f"controller.quorum.bootstrap.servers={h}:{c}")  # fmt: skip

    def _logs(self) -> list[str]:
        return node_logs(self.data_dir / "logs" if self.data_dir else None)

    def _logs_contain(self, text: str) -> bool:
        return any(text in line for line in self._logs())

    def _log_tail(self) -> str:
        """The broker's last error lines, for one-line error messages."""
        return log_tail(self.data_dir / "logs" if self.data_dir else None)
