"""A real N-node Apache Kafka cluster (KRaft) on loopback, from the same Maven Central jars.

Every node is a combined broker+controller (``process.roles=broker,controller``) with its own
client and controller ports and its own data directory; all share one cluster id and a static
controller quorum of all N nodes (``controller.quorum.voters``: formatted with plain
``kafka-storage format``, no voter set to bootstrap, and a node may come back on any address).

Ports are ephemeral ports bound by this process (SO_REUSEADDR, not listening) and held until the
node's JVM answers on them, so nothing else can take them in between; a node that is stopped or
killed gets its ports held again until it is restarted, on the same ports and data directory.

Readiness is a real signal: every running node answers ApiVersions and its metadata lists every
running node as a live (registered, unfenced) broker, and the controller quorum (DescribeQuorum)
has a leader among its N voters.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .local_kafka import (
    KAFKA_VERSION,
    ClusterMetadata,
    KafkaUnavailable,
    QuorumState,
    api_versions_ok,
    describe_quorum,
    format_command,
    java_command,
    log_tail,
    metadata,
    new_cluster_id,
    node_logs,
    provision,
    server_properties,
    spawn_node,
    terminate,
    write_node_files,
)

# Three JVMs on a small machine (2 cores): -Xmx384m each carries the test suite's load (RSS ~290 MiB
# a node once formed, ~300-390 MiB after ~150,000 acks=all records and a rolling restart), and
# the C1 compiler only (-XX:TieredStopAtLevel=1) halves the CPU the JVMs burn warming up: the
# cluster formed in 5-8 s instead of 9.5-12 s, and the three-broker tests took ~2/3 of the time.
DEFAULT_HEAP = "384m"
DEFAULT_JVM_OPTIONS = ("-XX:TieredStopAtLevel=1",)

# A SIGKILLed broker is fenced (its partitions get new leaders, it leaves the ISRs) once it has
# missed heartbeats for broker.session.timeout.ms (Kafka's defaults: 2 s heartbeats, 9 s session).
CLUSTER_PROPERTIES: dict[str, str] = {
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "4000",
}


def reserve_port(host: str, port: int = 0) -> socket.socket:
    """A socket bound (SO_REUSEADDR, not listening) to host:port, port 0 for an ephemeral one.

    While it is held, the kernel gives the port to no other ephemeral bind or outgoing
    connection and refuses binds without SO_REUSEADDR, while a JVM binding it with SO_REUSEADDR
    (as Kafka's listeners do) can still listen on it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


@dataclass
class KafkaNode:
    """One node of a LocalKafkaCluster: node id index+1, fixed ports, its own data directory."""

    index: int
    host: str
    port: int
    controller_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    held: list[socket.socket] = field(default_factory=list, repr=False)

    @property
    def node_id(self) -> int:
        return self.index + 1

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def log_path(self) -> Path:
        return self.logs_dir / "server.log"

    def hold_ports(self) -> None:
        """Hold this node's ports while its JVM is not running (best effort: a port some other
        process took meanwhile makes the next start fail with a clear error instead)."""
        if self.held:
            return
        for port in (self.port, self.controller_port):
            with contextlib.suppress(OSError):
                self.held.append(reserve_port(self.host, port))

    def release_ports(self) -> None:
        held, self.held = self.held, []
        for s in held:
            s.close()

    def rss_bytes(self) -> int | None:
        """Resident set size of the node's JVM (from /proc), None when it is not running."""
        if not self.running:
            return None
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return None


@dataclass
class LocalKafkaCluster:
    """N combined broker+controller nodes on loopback, owned by this object (by pid).

    ``start()`` provisions, formats and starts all nodes and returns once the cluster has formed;
    ``kill(i)`` / ``stop_node(i)`` / ``start_node(i)`` / ``restart(i)`` act on node index i
    (node id i+1) keeping its ports and data; ``stop()`` stops them all. Blocking calls: from
    async code, run them with ``asyncio.to_thread``."""

    brokers: int = 3
    data_dir: Path | None = None
    ports: Sequence[int] | None = None  # client ports, one per node; default: ephemeral
    version: str = KAFKA_VERSION
    heap: str = DEFAULT_HEAP
    host: str = "127.0.0.1"
    cache_dir: Path | None = None
    start_timeout: float = 120.0
    properties: Mapping[str, str] = field(default_factory=dict)  # extra server.properties
    jvm_options: Sequence[str] = DEFAULT_JVM_OPTIONS  # extra JVM options, before the main class
    nodes: list[KafkaNode] = field(default_factory=list, init=False)
    cluster_id: str | None = field(default=None, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    _libs: Path | None = field(default=None, init=False, repr=False)
    _own_dir: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.brokers < 1:
            raise ValueError("a cluster needs at least one broker")
        if self.ports is not None and len(self.ports) != self.brokers:
            raise ValueError(f"{len(self.ports)} ports for {self.brokers} brokers")

    # -- addresses and state -----------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """Comma-separated HOST:PORT of every node (clients' bootstrap.servers)."""
        return ",".join(n.address for n in self.nodes)

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    @property
    def pids(self) -> list[int | None]:
        return [n.pid for n in self.nodes]

    def index_of(self, node_id: int) -> int:
        """The index of the node with this Kafka node id (broker id)."""
        for n in self.nodes:
            if n.node_id == node_id:
                return n.index
        raise KeyError(node_id)

    def running(self) -> list[KafkaNode]:
        return [n for n in self.nodes if n.running]

    def rss_bytes(self) -> list[int | None]:
        """Resident set size of each node's JVM, None for a node that is not running."""
        return [n.rss_bytes() for n in self.nodes]

    # -- the whole cluster -------------------------------------------------------------------------

    def start(self) -> LocalKafkaCluster:
        """Provision, format and start every node; return once the cluster has formed. Called
        again after stop(), it starts the same nodes on the same ports and data directories."""
        if any(n.running for n in self.nodes):
            raise RuntimeError("the cluster is already running")
        self._libs = provision(self.version, self.cache_dir)
        t0 = time.monotonic()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="signer-kafka-cluster-"))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.nodes:
                self.nodes = self._plan_nodes(self.data_dir)
            for n in self.nodes:
                n.hold_ports()
                write_node_files(n.data_dir, self._properties(n))
            self._format_storage()
            for n in self.nodes:
                self._spawn(n)
            self._wait_formed(time.monotonic() + self.start_timeout, "to form")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every running node at once (by pid) and SIGKILL any still running after
        `timeout` seconds. Once fewer than a majority of the nodes are left, those left can only
        wait for peers that are gone (the last controller waits 5 s to hand over its leadership):
        they get one more second, then SIGKILL, which loses nothing they wrote (the page cache
        outlives the process); their logs are recovered at the next start, as after a crash."""
        procs = [n.proc for n in self.nodes if n.proc is not None]
        for n in self.nodes:
            n.proc = None
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        majority = len(self.nodes) // 2 + 1
        deadline = time.monotonic() + timeout
        while True:
            alive = [proc for proc in procs if proc.poll() is None]
            if not alive:
                break
            now = time.monotonic()
            if len(alive) < majority and len(self.nodes) > 1:
                deadline = min(deadline, now + 1.0)
                majority = 0  # the grace is given once
            if now >= deadline:
                for proc in alive:
                    proc.kill()
                    proc.wait(10)
                break
            time.sleep(0.05)  # polls the processes' exit
        for n in self.nodes:
            n.release_ports()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.nodes = []
            self.data_dir = None
            self._own_dir = False

    def __enter__(self) -> LocalKafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one node ----------------------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (by pid) and reap it; its ports are held until start_node()."""
        n = self.nodes[index]
        if n.proc is not None:
            n.proc.kill()
            n.proc.wait(10)
            n.proc = None
        n.hold_ports()

    def stop_node(self, index: int, timeout: float = 30.0) -> None:
        """SIGTERM node `index` (controlled shutdown: it hands over its leaderships first),
        SIGKILL it after `timeout` seconds; its ports are held until start_node()."""
        n = self.nodes[index]
        if n.proc is not None:
            terminate(n.proc, timeout)
            n.proc = None
        n.hold_ports()

    def start_node(self, index: int, timeout: float | None = None) -> None:
        """Start node `index` again on its ports and data directory; return once it answers and
        every running node, itself included, sees every running node as a live broker."""
        n = self.nodes[index]
        if n.running:
            raise RuntimeError(f"node {index} is running")
        n.hold_ports()
        write_node_files(n.data_dir, self._properties(n))
        self._spawn(n)
        self._wait_formed(time.monotonic() + (timeout or self.start_timeout), f"to take node {index} back")

    def restart(self, index: int, *, kill: bool = False, timeout: float | None = None) -> None:
        """Stop (SIGTERM, or SIGKILL with kill=True) and start node `index` again."""
        if kill:
            self.kill(index)
        else:
            self.stop_node(index)
        self.start_node(index, timeout)

    def rolling_restart(
        self, topics: Sequence[str] | None = None, *, kill: bool = False, timeout: float = 60.0
    ) -> None:
        """Restart every node in turn; before the next one goes, wait until every partition of
        `topics` (None: all topics, internal ones included) has its full ISR again."""
        for n in self.nodes:
            self.restart(n.index, kill=kill)
            self.wait_in_sync(topics, timeout)

    # -- metadata ----------------------------------------------------------------------------------

    def metadata(self, topics: Sequence[str] | None = (), index: int | None = None) -> ClusterMetadata:
        """One running node's metadata (the first that answers, or node `index`)."""
        candidates = [self.nodes[index]] if index is not None else self.running()
        for n in candidates:
            md = metadata(n.host, n.port, topics)
            if md is not None:
                return md
        raise KafkaUnavailable("no running node answered a metadata request")

    def quorum(self) -> QuorumState:
        """The controller quorum as a running node reports it (DescribeQuorum)."""
        for n in self.running():
            q = describe_quorum(n.host, n.port)
            if q is not None:
                return q
        raise KafkaUnavailable("no running node answered a DescribeQuorum request")

    def controller(self, timeout: float = 30.0) -> int:
        """The index of the active controller (the quorum leader), once it is a running node."""
        found: list[int] = []

        def led() -> bool:
            for n in self.running():
                q = describe_quorum(n.host, n.port)
                ids = {m.node_id for m in self.running()}
                if q is not None and q.leader_id in ids:
                    found.append(self.index_of(q.leader_id))
                    return True
            return False

        self._wait(led, time.monotonic() + timeout, "to elect an active controller")
        return found[-1]

    def leader(self, topic: str, partition: int = 0, timeout: float = 30.0) -> int:
        """The index of the running node that leads `topic`/`partition` (waits for one)."""
        found: list[int] = []

        def led_by_running_node() -> bool:
            for n in self.running():
                md = metadata(n.host, n.port, [topic])
                state = md.topics.get(topic, {}).get(partition) if md else None
                if state is not None and state.leader >= 0:
                    idx = self.index_of(state.leader)
                    if self.nodes[idx].running:
                        found.append(idx)
                        return True
            return False

        self._wait(led_by_running_node, time.monotonic() + timeout, f"to elect a leader of {topic}/{partition}")
        return found[-1]

    def wait_in_sync(self, topics: Sequence[str] | None = None, timeout: float = 60.0) -> None:
        """Wait until, as every running node sees it, every partition of `topics` (None: all
        topics) has a leader and all its replicas in sync."""

        def in_sync() -> bool:
            for n in self.running():
                md = metadata(n.host, n.port, topics)
                if md is None or (topics is not None and set(md.topics) != set(topics)):
                    return False
                for parts in md.topics.values():
                    for p in parts.values():
                        if p.leader < 0 or set(p.isr) != set(p.replicas):
                            return False
            return True

        self._wait(in_sync, time.monotonic() + timeout, "to bring every replica in sync")

    # -- internals ---------------------------------------------------------------------------------

    def _plan_nodes(self, data_dir: Path) -> list[KafkaNode]:
        nodes: list[KafkaNode] = []
        try:
            for i in range(self.brokers):
                wanted = self.ports[i] if self.ports else 0
                try:
                    client = reserve_port(self.host, wanted)
                except OSError as exc:
                    raise KafkaUnavailable(f"port {wanted} on {self.host} is in use ({exc.strerror})") from None
                controller = reserve_port(self.host)
                nodes.append(KafkaNode(i, self.host, client.getsockname()[1], controller.getsockname()[1],
                                       data_dir / f"node-{i + 1}", held=[client, controller]))  # fmt: skip
        except BaseException:
            for n in nodes:
                n.release_ports()
            raise
        return nodes

    def _properties(self, n: KafkaNode) -> str:
        voters = ",".join(f"{m.node_id}@{m.host}:{m.controller_port}" for m in self.nodes)
        return server_properties(
            node_id=n.node_id, host=n.host, port=n.port, controller_port=n.controller_port,
            log_dir=n.data_dir / "kraft-logs", quorum=f"controller.quorum.voters={voters}",
            nodes=self.brokers, extra={**CLUSTER_PROPERTIES, **self.properties},
        )  # fmt: skip

    def _java(self, n: KafkaNode) -> list[str]:
        assert self._libs is not None
        return java_command(self._libs, n.logs_dir, n.data_dir / "log4j2.properties", self.heap, self.jvm_options)

    def _format_storage(self) -> None:
        """Format, in parallel, the storage of the nodes that have none yet, with the cluster id
        of those that have (a cluster started again on its data directory keeps its id)."""
        todo = []
        for n in self.nodes:
            meta = n.data_dir / "kraft-logs" / "meta.properties"
            if meta.exists():
                for line in meta.read_text().splitlines():
                    if line.startswith("cluster.id="):
                        self.cluster_id = line.split("=", 1)[1].strip()
            else:
                todo.append(n)
        self.cluster_id = self.cluster_id or new_cluster_id()
        cmds = [format_command(self._java(n), n.data_dir / "server.properties", self.cluster_id) for n in todo]
        fmts = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
        failures = []
        for n, f in zip(todo, fmts, strict=True):
            out, _ = f.communicate()
            if f.returncode != 0:
                failures.append(f"node {n.index}: {out.strip()[-400:]}")
        if failures:
            raise KafkaUnavailable(f"kafka storage format failed: {' | '.join(failures)}")

    def _spawn(self, n: KafkaNode) -> None:
        n.proc = spawn_node(self._java(n), n.data_dir / "server.properties", n.logs_dir)

    def _wait_formed(self, deadline: float, what: str) -> None:
        voters = {n.node_id for n in self.nodes}

        def formed() -> bool:
            running = self.running()
            ids = {n.node_id for n in running}
            for n in running:
                if not api_versions_ok(n.host, n.port):
                    return False
                n.release_ports()  # its JVM listens on both ports now
                md = metadata(n.host, n.port)
                if md is None or not ids <= set(md.brokers) or md.controller_id not in md.brokers:
                    return False
            q = describe_quorum(running[0].host, running[0].port) if running else None
            return q is not None and set(q.voters) == voters and q.leader_id in voters

        self._wait(formed, deadline, what)

    def _wait(self, condition: Callable[[], bool], deadline: float, what: str) -> None:
        """Poll `condition` until it holds; a node we started dying meanwhile is an error."""
        expected = [n for n in self.nodes if n.proc is not None]
        while not condition():
            for n in expected:
                assert n.proc is not None
                if n.proc.poll() is not None:
                    code, n.proc = n.proc.returncode, None
                    n.hold_ports()
                    if any("Address already in use" in line for line in node_logs(n.logs_dir)):
                        raise KafkaUnavailable(f"kafka node {n.index} could not bind its ports "
                                               f"{n.port}/{n.controller_port}: {log_tail(n.logs_dir)}")  # fmt: skip
                    raise KafkaUnavailable(f"kafka node {n.index} exited with {code}; see {n.logs_dir}: "
                                           f"{log_tail(n.logs_dir)}")  # fmt: skip
            if time.monotonic() > deadline:
                raise KafkaUnavailable(f"kafka cluster took too long {what}; logs in {self.data_dir}")
            time.sleep(0.1)  # poll interval of the readiness probe, not a readiness assumption
