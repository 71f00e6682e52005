"""Local topologies, built one way: Kafka, the dev KMS, enclave worker processes on Unix sockets
standing in for vsock (optionally behind a shaped link), host workers in-process or as
`signer host` processes, and the one wrapper every child process runs in.

Used by `signer up` / `signer demo` (signer/cluster.py), the benchmarks and the tests. Every
child announces that it serves the same way: one stdout line `READY <address>` (the dev KMS
and a host print an http:// URL, an enclave worker its listening URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from broker.topics import TopicLayout, ensure_topics

from .config import HostConfig

if TYPE_CHECKING:
    import socket

    from aiohttp import web

    from broker.local_kafka import LocalKafka
    from devkms.local import DevEnclave

    from .backend import EnclaveBackend
    from .host import HostWorker
    from .metrics import HostMetrics
    from .operator import AdminSession
    from .pool import PoolSettings

ROOT = Path(__file__).resolve().parents[1]  # where the project's packages are imported from
READY = "READY "
_KMS_CREDENTIALS = ("SIGNER_KMS_ACCESS_KEY_ID", "SIGNER_KMS_SECRET_ACCESS_KEY")


class ChildProcess:
    """A `python -m MODULE ARGS` child, owned by its pid.

    Ready when it prints `READY <address>` on stdout (`address` keeps it). Every stdout line is kept
    in `output`; stderr is appended to `log`, or without one goes where this process's goes. The
    child imports the same code as this process (`pythonpath`, if given, comes first and is its
    working directory). Async code awaits start()/ready()/astop(); synchronous code uses
    spawn()/wait_ready()/stop() - the same object, the same readiness rule.
    """

    def __init__(
        self, module: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None, *,
        log: Path | None = None, pythonpath: str | None = None, name: str = "",
    ) -> None:  # fmt: skip
        self.module, self.args, self.env = module, list(args), dict(env or {})
        self.log, self.pythonpath, self.name = log, pythonpath, name or module
        self.address = ""
        self.output: list[str] = []
        self.popen: subprocess.Popen[bytes] | None = None
        self._cursor = 0  # lines before it were already looked at by wait_for_line
        self._eof = False
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._stderr: IO[bytes] | None = None

    # -- starting ---------------------------------------------------------------------------------

    def spawn(self) -> ChildProcess:
        paths = [self.pythonpath, str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        pythonpath = os.pathsep.join(dict.fromkeys(p for p in paths if p))
        env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **self.env}
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self._stderr = open(self.log, "ab")  # closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args], stdout=subprocess.PIPE, stderr=self._stderr,
            stdin=subprocess.DEVNULL, env=env, cwd=self.pythonpath,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name=f"{self.name} stdout", daemon=True)
        self._reader.start()
        return self

    async def start(self, timeout: float = 60.0) -> str:
        """Spawn, wait for the READY line and return its address; a child that fails to start is killed."""
        self.spawn()
        return await self.ready(timeout)

    async def ready(self, timeout: float = 60.0) -> str:
        try:
            return await asyncio.to_thread(self.wait_ready, timeout)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.stop, signal.SIGKILL))
            raise

    def wait_ready(self, timeout: float = 60.0) -> str:
        line = self.wait_for_line(READY, timeout)
        self.address = line[len(READY) :].strip()
        return self.address

    def wait_for_line(self, prefix: str, timeout: float = 60.0) -> str:
        """Block until the child prints a line starting with prefix (lines are looked at once, in order)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i in range(self._cursor, len(self.output)):
                    if self.output[i].startswith(prefix):
                        self._cursor = i + 1
                        return self.output[i]
                self._cursor = len(self.output)
                if self._eof:
                    code = self.popen.poll() if self.popen else None
                    raise RuntimeError(f"{self.name} exited ({code}) before printing {prefix!r}; "
                                       f"output: {self.output[-10:]}; log: {self.log_tail()}")  # fmt: skip
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name}: no line {prefix!r} within {timeout}s; "
                                       f"output: {self.output[-10:]}; log: {self.log_tail()}")  # fmt: skip
                self._changed.wait(remaining)

    def _read(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        for raw in self.popen.stdout:
            with self._changed:
                self.output.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def log_tail(self, lines: int = 8) -> str:
        if self.log is not None and self.log.exists():
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- state and signals ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def send_signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit by itself; its exit code."""
        assert self.popen is not None, "not started"
        code = self.popen.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    # -- stopping ---------------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the child (by pid) and wait for it; SIGKILL past the timeout. Its exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return self.popen.returncode

    async def astop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        return await asyncio.to_thread(self.stop, sig, timeout)

    def __enter__(self) -> ChildProcess:
        return self if self.popen is not None else self.spawn()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> ChildProcess:
        if self.popen is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()


def unix_url(sock_dir: Path, name: str) -> str:
    """Where an enclave worker named `name` listens (a Unix socket standing in for vsock)."""
    return f"unix://{sock_dir / (name + '.sock')}"


def enclave_process(
    listen: str, name: str, env: Mapping[str, str] | None = None, *, log: Path | None = None,
    pythonpath: str | None = None, handler: str | None = None, credits: int | None = None,
) -> ChildProcess:  # fmt: skip
    """An enclave worker process (not started): `python -m enclave_worker --listen URL --enclave-id NAME`."""
    args = ["--listen", listen, "--enclave-id", name]
    if handler is not None:
        args += ["--handler", handler]
    if credits is not None:
        args += ["--credits", str(credits)]
    return ChildProcess("enclave_worker", args, env, log=log, pythonpath=pythonpath, name=name)


def kms_process(
    data_dir: Path, env: Mapping[str, str] | None = None, *, port: int | None = None, log: Path | None = None
) -> ChildProcess:
    """The dev KMS process (not started), with the dev credentials unless `env` says otherwise."""
    from devkms.local import dev_credentials

    args = ["--data-dir", str(data_dir)] + (["--port", str(port)] if port is not None else [])
    return ChildProcess("devkms", args, {**dev_credentials(), **(env or {})}, log=log, name="devkms")


@dataclass
class Enclaves:
    """A description of enclave workers: `count` of them named PREFIX0, PREFIX1, ...; the link the
    hosts reach them over (a shaping query such as "?latency_ms=30"); extra environment; the code
    they run (`pythonpath`, default this project's); whether they get the KMS credentials (without
    them they wait for a host to hand its own over)."""

    count: int = 1
    prefix: str = "enclave-"
    link: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    pythonpath: str | None = None
    kms_credentials: bool = True
    handler: str | None = None
    credits: int | None = None


@dataclass
class Enclave:
    name: str
    listen: str  # where the worker listens
    link: str  # the link shaping hosts apply on their side ("" for none)
    process: ChildProcess

    @property
    def url(self) -> str:
        """What a host is configured with: the address and its link."""
        return self.listen + self.link


@dataclass
class HostProcess:
    """A `signer host` process and the configuration it was started with."""

    name: str
    config: HostConfig
    process: ChildProcess

    @property
    def url(self) -> str:
        return self.process.address

    @property
    def port(self) -> int:
        port = urlsplit(self.process.address).port
        assert port is not None, self.process.address
        return port


@dataclass
class LocalHost:
    """A host worker in this process: its HTTP endpoints and its consume loop."""

    worker: HostWorker
    http: web.AppRunner
    port: int
    run: asyncio.Task[None]

    async def wait(self) -> None:
        """Return when the consume loop ends (re-raising its failure)."""
        await asyncio.shield(self.run)  # a cancelled waiter must not cancel the loop itself

    async def stop(self) -> None:
        """Stop fetching, drain and commit within the shutdown timeout; then close the HTTP endpoints."""
        try:
            await self.worker.stop_within(self.run, self.worker.config.shutdown_timeout_s)
        finally:
            await self.http.cleanup()


class Topology:
    """One local cluster: start its parts, find them by name, stop them all (by pid).

    State lives under `data_dir`: the dev KMS (`devkms/`), the dev enclave configuration and
    operator key (`enclave/` unless provisioned elsewhere), the key store (`keystore/`, unless
    `keystore` names another store by URL) and, when started here, Kafka (`kafka/`). Enclave
    sockets go to `sock_dir` (default: a short directory of its own). Child logs go to
    `log_dir/NAME.log`, or without one to this process's stderr.
    Hosts get this topology's Kafka, topics (`layout`), consumer group, enclaves and key store,
    over the environment and `host_settings` (SIGNER_* variables as strings).
    """

    def __init__(
        self, data_dir: Path, *, sock_dir: Path | None = None, log_dir: Path | None = None, bootstrap: str = "",
        layout: TopicLayout | None = None, group_id: str | None = None,
        host_settings: Mapping[str, str] | None = None, log_level: str | None = None, keystore: str | None = None,
    ) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.keystore = keystore  # the key store's URL; None: the directory data_dir/keystore
        self.log_dir = log_dir
        self.bootstrap = bootstrap
        self.layout = layout
        self.group_id = group_id
        self.host_settings = dict(host_settings or {})
        self.log_level = log_level
        self.kafka: LocalKafka | None = None
        self.kms: ChildProcess | None = None
        self.kms_url = ""
        self.dev: DevEnclave | None = None
        self.enclaves: dict[str, Enclave] = {}
        self.hosts: dict[str, HostProcess] = {}
        self.local_hosts: list[LocalHost] = []
        self.gateways: dict[str, ChildProcess] = {}
        self.backends: list[EnclaveBackend] = []
        self._sock_dir = sock_dir
        self._own_sock_dir = sock_dir is None
        self._topics: set[tuple[str, TopicLayout]] = set()

    @property
    def sock_dir(self) -> Path:
        if self._sock_dir is None:  # Unix socket paths are limited to ~108 bytes: a short directory
            self._sock_dir = Path(tempfile.mkdtemp(prefix="signer-", dir="/tmp"))
        return self._sock_dir

    @property
    def keystore_dir(self) -> Path:
        return self.data_dir / "keystore"

    @property
    def keystore_url(self) -> str:
        """The key store hosts and backends use: `keystore` if given, else dir:// of keystore_dir."""
        return self.keystore or f"dir://{self.keystore_dir}"

    def _log(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir is not None else None

    def _child_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        level = {"SIGNER_LOG_LEVEL": self.log_level} if self.log_level else {}
        return {**level, **(env or {})}

    async def __aenter__(self) -> Topology:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- Kafka ------------------------------------------------------------------------------------

    async def start_kafka(self, data_dir: Path | None = None) -> str:
        """A local single-node Kafka (KRaft); its bootstrap address becomes the hosts'."""
        from broker.local_kafka import LocalKafka

        self.kafka = LocalKafka(data_dir=data_dir or self.data_dir / "kafka")
        await asyncio.to_thread(self.kafka.start)
        self.bootstrap = self.kafka.bootstrap
        return self.bootstrap

    async def create_topics(self, bootstrap: str, layout: TopicLayout) -> None:
        if (bootstrap, layout) not in self._topics:
            await ensure_topics(bootstrap, layout)
            self._topics.add((bootstrap, layout))

    # -- the dev KMS and the dev enclave configuration ----------------------------------------------

    async def start_kms(self, timeout: float = 60.0) -> str:
        """The dev KMS on data_dir/devkms; started again, it keeps its address (enclave
        configurations name it)."""
        port = urlsplit(self.kms_url).port if self.kms_url else None
        self.kms = kms_process(self.data_dir / "devkms", self._child_env(), port=port, log=self._log("devkms"))
        self.kms_url = await self.kms.start(timeout)
        return self.kms_url

    async def stop_kms(self) -> None:
        if self.kms is not None:
            await self.kms.astop()

    async def provision(self, kms_key_arn: str | None = None, out_dir: Path | None = None) -> DevEnclave:
        """The dev enclave configuration (in out_dir, default data_dir/enclave), the dev operator key
        and a keyring KMS key that releases data keys to this code's measurement only."""
        from devkms.local import provision_dev_enclave

        self.dev = await provision_dev_enclave(
            self.kms_url, self.data_dir / "devkms", out_dir or self.data_dir / "enclave", kms_key_arn
        )
        return self.dev

    # -- enclaves ---------------------------------------------------------------------------------

    def _enclave(self, name: str, spec: Enclaves) -> Enclave:
        env = dict(self.dev.env) if self.dev is not None else {}
        if not spec.kms_credentials:
            env = {k: v for k, v in env.items() if k not in _KMS_CREDENTIALS}
        listen = unix_url(self.sock_dir, name)
        proc = enclave_process(listen, name, self._child_env({**env, **spec.env}), log=self._log(name),
                               pythonpath=spec.pythonpath, handler=spec.handler, credits=spec.credits)  # fmt: skip
        enclave = Enclave(name, listen, spec.link, proc)
        self.enclaves[name] = enclave  # known before it is ready: aclose() stops it whatever happens
        proc.spawn()
        return enclave

    async def start_enclaves(self, spec: Enclaves, timeout: float = 60.0) -> list[Enclave]:
        """Start the described enclave workers side by side; return when every one is READY."""
        started = [self._enclave(f"{spec.prefix}{i}", spec) for i in range(spec.count)]
        for enclave in started:
            await enclave.process.ready(timeout)
        return started

    async def start_enclave(
        self, name: str, *, link: str = "", env: Mapping[str, str] | None = None, pythonpath: str | None = None,
        kms_credentials: bool = True, handler: str | None = None, credits: int | None = None, timeout: float = 60.0,
    ) -> Enclave:  # fmt: skip
        """One enclave worker named `name` (started again under the same name, it listens at the same address)."""
        spec = Enclaves(1, "", link, env or {}, pythonpath, kms_credentials, handler, credits)
        enclave = self._enclave(name, spec)
        await enclave.process.ready(timeout)
        return enclave

    # -- hosts ------------------------------------------------------------------------------------

    def host_config(self, settings: Mapping[str, str] | None = None, **overrides: Any) -> HostConfig:
        """A host's configuration: the environment, then `host_settings` and `settings` (SIGNER_*
        variables), then this topology's Kafka, topics, group, enclaves and key store, then
        `overrides` (HostConfig field names)."""
        base: dict[str, Any] = {
            "bootstrap": self.bootstrap,
            "enclaves": [e.url for e in self.enclaves.values()],
            "keystore": self.keystore_url,
        }
        if self.layout is not None:
            base["layout"] = self.layout
        if self.group_id is not None:
            base["group_id"] = self.group_id
        environ = {**os.environ, **self.host_settings, **(settings or {})}
        return HostConfig.from_env(environ=environ, **{**base, **overrides})

    async def start_host(
        self, name: str = "host", *, settings: Mapping[str, str] | None = None, timeout: float = 120.0,
        **overrides: Any,
    ) -> HostProcess:  # fmt: skip
        """A `signer host` process, started with HostConfig.to_env() of its configuration; ready when it
        prints `READY http://HOST:PORT` (its HTTP endpoints and Kafka consumer are up). Unless set, its
        HTTP port is any free one and its transactional id its own."""
        explicit = {**self.host_settings, **(settings or {})}
        if "SIGNER_HTTP_PORT" not in explicit:
            overrides.setdefault("http_port", 0)
        if "SIGNER_TRANSACTIONAL_ID" not in explicit:
            overrides.setdefault("transactional_id", "")
        config = self.host_config(settings, **overrides)
        await self.create_topics(config.bootstrap, config.layout)
        proc = ChildProcess("signer", ["host"], self._child_env(config.to_env()), log=self._log(name), name=name)
        host = HostProcess(name, config, proc)
        self.hosts[name] = host
        proc.spawn()
        await proc.ready(timeout)
        return host

    async def start_local_host(self, config: HostConfig, http_socket: socket.socket | None = None) -> LocalHost:
        """A host worker in this process (serving on `http_socket` if given, already bound)."""
        from .host import HostWorker
        from .http import serve_http

        await self.create_topics(config.bootstrap, config.layout)
        worker = HostWorker(config)
        await worker.start()
        run = asyncio.create_task(worker.run(), name="host-worker")
        try:
            http, port = await serve_http(worker, config.http_host, config.http_port, sock=http_socket)
        except BaseException:
            await worker.stop_within(run, config.shutdown_timeout_s)
            raise
        host = LocalHost(worker, http, port, run)
        self.local_hosts.append(host)
        return host

    async def start_backend(
        self, pool_settings: PoolSettings | None = None, *, urls: list[str] | None = None,
        metrics: HostMetrics | None = None, credentials: Callable[[], dict[str, str] | None] | None = None,
        ready_timeout: float = 20.0,
    ) -> EnclaveBackend:  # fmt: skip
        """The host's enclave backend in this process, without Kafka: the pool over this topology's
        enclaves (or `urls`) and the topology's key store; returns once a connection is live."""
        from .backend import EnclaveBackend
        from .keystore import open_keystore

        urls = urls or [e.url for e in self.enclaves.values()]
        store = open_keystore(self.keystore_url, bootstrap=self.bootstrap)
        backend = EnclaveBackend(urls, store, pool_settings, metrics, credentials=credentials)
        self.backends.append(backend)
        await backend.start(ready_timeout=ready_timeout)
        return backend

    async def start_gateway(
        self, name: str = "gateway", *, settings: Mapping[str, str] | None = None, timeout: float = 120.0
    ) -> ChildProcess:
        """A `python -m signer gateway` process on this topology's Kafka, topics and key store (read for
        the public key directory); ready when it prints `READY http://HOST:PORT` (its reply topic is
        created and read). SIGNER_GATEWAY_* come from `settings`; its port is any free one unless set."""
        config = self.host_config()
        await self.create_topics(config.bootstrap, config.layout)
        env = {k: v for k, v in config.to_env().items() if k.startswith(("KAFKA_", "SIGNER_TOPIC_", "SIGNER_KEYSTORE"))}
        # a store that is not a directory is re-read on the gateway's timer only: a short one
        refresh = {} if self.keystore_url.startswith("dir://") else {"SIGNER_GATEWAY_KEYS_REFRESH_S": "1"}
        env = {"SIGNER_GATEWAY_PORT": "0", **refresh, **env, **self.host_settings, **(settings or {})}
        proc = ChildProcess("signer", ["gateway"], self._child_env(env), log=self._log(name), name=name)
        self.gateways[name] = proc
        proc.spawn()
        await proc.ready(timeout)
        return proc

    def operator(self, layout: TopicLayout | None = None) -> AdminSession:
        """The dev operator reaching the cluster through Kafka, as `signer keys` does: it signs each
        operation and verifies each receipt."""
        from .admin_client import admin_call

        assert self.dev is not None, "provision() first"
        bootstrap, topics = self.bootstrap, layout or self.layout or TopicLayout()

        async def call(op: str, args: dict[str, Any]) -> dict[str, Any]:
            return await admin_call(bootstrap, op, args, topics)

        return cast("AdminSession", self.dev.admin(call))

    # -- by name ----------------------------------------------------------------------------------

    def process(self, name: str) -> ChildProcess:
        """The process of the host, enclave or ("devkms") dev KMS with this name."""
        if name in self.hosts:
            return self.hosts[name].process
        if name in self.enclaves:
            return self.enclaves[name].process
        if name in self.gateways:
            return self.gateways[name]
        if name == "devkms" and self.kms is not None:
            return self.kms
        raise KeyError(name)

    # -- stopping ---------------------------------------------------------------------------------

    async def aclose(self, kill: bool = False) -> None:
        """Stop everything, in order: in-process hosts (drained), host processes, in-process backends, enclaves,
        the dev KMS, Kafka. With kill, host and enclave processes get SIGKILL instead of SIGTERM."""
        sig = signal.SIGKILL if kill else signal.SIGTERM
        try:
            await _stop_all(list(self.gateways.values()), sig)  # callers get their answers or errors first
            for local in self.local_hosts:
                with _logged("local host"):
                    await local.stop()
            self.local_hosts = []
            await _stop_all([h.process for h in self.hosts.values()], sig)
            for backend in self.backends:
                with _logged("backend"):
                    await backend.close()
            self.backends = []
            await _stop_all([e.process for e in self.enclaves.values()], sig)
            if self.kms is not None:
                await self.kms.astop()
        finally:
            if self.kafka is not None:
                await asyncio.to_thread(self.kafka.stop)
                self.kafka = None
            if self._own_sock_dir and self._sock_dir is not None:
                shutil.rmtree(self._sock_dir, ignore_errors=True)
                self._sock_dir = None


async def _stop_all(procs: list[ChildProcess], sig: int) -> None:
    """Stop the processes side by side."""
    await asyncio.gather(*(proc.astop(sig) for proc in procs), return_exceptions=True)


@contextlib.contextmanager
def _logged(what: str) -> Any:
    """Log a failure to stop one part and go on stopping the others."""
    try:
        yield
    except Exception as exc:
        import structlog

        structlog.get_logger("topology").warning("stop_failed", part=what, error=repr(exc))
