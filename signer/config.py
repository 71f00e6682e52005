"""Host worker configuration: one place, environment variables with documented defaults."""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from broker.topics import TopicLayout

from .channel import ChannelSettings
from .pool import PoolSettings


def load_config_file(path: str) -> dict[str, str]:
    """SIGNER_CONFIG_FILE: a TOML file of NAME = value pairs with the same names as the
    environment variables; its values as the environment would carry them. A file that cannot
    be read or parsed, or a value that is not a string, number or boolean, is a ConfigError
    naming the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"SIGNER_CONFIG_FILE={path}: {exc}") from None
    values: dict[str, str] = {}
    for k, v in data.items():
        if not isinstance(v, str | int | float | bool):
            raise ConfigError(f"SIGNER_CONFIG_FILE={path}: {k} must be a string, number or boolean, "
                              f"not a {type(v).__name__}")  # fmt: skip
        values[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return values


class _Settings(dict[str, str]):
    """The settings a configuration is read from (file values under the environment); remembers
    which names were looked up, so that a name in the file that nothing reads is reported."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        self.read.add(name)
        return super().get(name, default)


def _env(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    value = (os.environ if environ is None else environ).get(name, default)
    return default if value is None else value


def _bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    raw = _env(name, "true" if default else "false", environ).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (true/false)")


class ConfigError(ValueError):
    """A setting with a value the host cannot use; the message names the variable."""


def _int(name: str, default: int, minimum: int = 0, environ: Mapping[str, str] | None = None) -> int:
    raw = _env(name, str(default), environ)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _int_at_most(name: str, default: int, minimum: int, maximum: int, environ: Mapping[str, str] | None = None) -> int:
    value = _int(name, default, minimum, environ)
    if value > maximum:
        raise ConfigError(f"{name}={value} must be <= {maximum} (enclaves accept frames of at most 2 MiB)")
    return value


@dataclass
class HostConfig:
    bootstrap: str
    enclaves: list[str]
    group_id: str = "signer-hosts"
    layout: TopicLayout = field(default_factory=TopicLayout)
    max_batch: int = 500
    http_host: str = "127.0.0.1"
    http_port: int = 9464
    pool: PoolSettings = field(default_factory=PoolSettings)
    enclave_wait_s: float = 30.0
    shutdown_timeout_s: float = 30.0
    keystore: str = ""  # SIGNER_KEYSTORE: the key store's URL (signer/keystore.py)
    preload_keys: int = 10_000  # SIGNER_PRELOAD_KEYS: sealed keys pushed to an enclave on connect (newest)
    default_keyring: str = "default"
    kms_credentials_file: str = ""  # JSON as IMDS serves role credentials: AccessKeyId, SecretAccessKey, Token
    max_in_flight: int = 10_000  # records fetched and not yet done; above it partitions pause
    resume_below: int = 5_000  # paused partitions resume when in flight falls to this
    commit_interval_s: float = 0.2
    exactly_once: bool = False
    transactional_id: str = ""
    transaction_timeout_ms: int = 60_000
    session_timeout_ms: int = 10_000
    rebalance_drain_s: float = 20.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> HostConfig:
        """The configuration from the environment (`environ`, default os.environ) and SIGNER_CONFIG_FILE;
        `overrides` (field names) win over both."""
        environ = os.environ if environ is None else environ
        path = environ.get("SIGNER_CONFIG_FILE")
        from_file = load_config_file(path) if path else {}
        try:
            cfg = cls._read(_Settings({**from_file, **environ}), from_file)
        except ConfigError as exc:
            named = [k for k in from_file if k not in environ and f"{k}=" in str(exc)]
            if named:  # a bad value that came from the file: say so
                raise ConfigError(f"{exc} (set in SIGNER_CONFIG_FILE={path})") from None
            raise
        for k, v in overrides.items():
            setattr(cfg, k, v)
        if cfg.resume_below < 0:
            cfg.resume_below = cfg.max_in_flight // 2
        if cfg.resume_below >= cfg.max_in_flight:
            raise ConfigError(f"SIGNER_RESUME_BELOW={cfg.resume_below} must be below SIGNER_MAX_IN_FLIGHT")
        return cfg

    @classmethod
    def _read(cls, environ: _Settings, from_file: Mapping[str, str]) -> HostConfig:
        """The configuration these settings (environment over file) give; a name in the file that no
        setting reads is refused (a misspelt name would otherwise be silently ignored)."""

        def env(name: str, default: str) -> str:
            return _env(name, default, environ)

        def num(name: str, default: int, minimum: int = 0) -> int:
            return _int(name, default, minimum, environ)

        layout = TopicLayout(
            requests=env("SIGNER_TOPIC_REQUESTS", "sign.requests"),
            results=env("SIGNER_TOPIC_RESULTS", "sign.results"),
            dlq=env("SIGNER_TOPIC_DLQ", "sign.dlq"),
            admin=env("SIGNER_TOPIC_ADMIN", "sign.admin"),
            admin_replies=env("SIGNER_TOPIC_ADMIN_REPLIES", "sign.admin.replies"),
            request_partitions=num("SIGNER_REQUEST_PARTITIONS", 12, 1),
            result_partitions=num("SIGNER_RESULT_PARTITIONS", 12, 1),
        )
        enclaves = [u.strip() for u in env("SIGNER_ENCLAVES", "").split(",") if u.strip()]
        cfg = cls(
            bootstrap=env("KAFKA_BOOTSTRAP", ""),
            enclaves=enclaves,
            group_id=env("SIGNER_GROUP_ID", "signer-hosts"),
            layout=layout,
            max_batch=num("SIGNER_MAX_BATCH", 500, 1),
            http_host=env("SIGNER_HTTP_HOST", "127.0.0.1"),
            http_port=num("SIGNER_HTTP_PORT", 9464),
            pool=PoolSettings(
                connections_per_enclave=num("SIGNER_CONNECTIONS_PER_ENCLAVE", 2, 1),
                spill_after=num("SIGNER_SPILL_AFTER", 256, 1),
                poison_attempts=num("SIGNER_POISON_ATTEMPTS", 3, 2),
                channel=ChannelSettings(
                    max_batch=num("SIGNER_FRAME_MAX_REQUESTS", 512, 1),
                    max_batch_bytes=_int_at_most("SIGNER_FRAME_MAX_BYTES", 1024 * 1024, 1024, 1024 * 1024, environ),
                    batch_window_s=num("SIGNER_BATCH_WINDOW_US", 0) / 1e6,
                    heartbeat_interval_s=num("SIGNER_HEARTBEAT_INTERVAL_MS", 1000, 10) / 1000,
                    dead_after_s=num("SIGNER_DEAD_AFTER_MS", 5000, 50) / 1000,
                ),
            ),
            enclave_wait_s=num("SIGNER_ENCLAVE_WAIT_S", 30),
            shutdown_timeout_s=num("SIGNER_SHUTDOWN_TIMEOUT_S", 30),
            keystore=_keystore(environ),
            preload_keys=num("SIGNER_PRELOAD_KEYS", 10_000),
            default_keyring=env("SIGNER_DEFAULT_KEYRING", "default"),
            kms_credentials_file=env("SIGNER_KMS_CREDENTIALS_FILE", ""),
            max_in_flight=num("SIGNER_MAX_IN_FLIGHT", 10_000, 1),
            resume_below=num("SIGNER_RESUME_BELOW", -1, -1),
            commit_interval_s=num("SIGNER_COMMIT_INTERVAL_MS", 200, 1) / 1000,
            exactly_once=_bool("SIGNER_EXACTLY_ONCE", False, environ),
            transactional_id=env("SIGNER_TRANSACTIONAL_ID", f"signer-{socket.gethostname()}-{os.getpid()}"),
            transaction_timeout_ms=num("SIGNER_TRANSACTION_TIMEOUT_MS", 60_000, 1000),
            session_timeout_ms=num("SIGNER_SESSION_TIMEOUT_MS", 10_000, 1000),
            rebalance_drain_s=num("SIGNER_REBALANCE_DRAIN_S", 20, 0),
        )
        unknown = sorted(set(from_file) - environ.read)
        if unknown:
            raise ConfigError(f"SIGNER_CONFIG_FILE={environ['SIGNER_CONFIG_FILE']}: not a host setting: "
                              f"{', '.join(unknown)} (see docs/configuration.md)")  # fmt: skip
        return cfg

    @property
    def keystore_dir(self) -> str:
        """The key store's directory if it is a dir:// store (readers that watch the directory), else its URL."""
        return self.keystore.removeprefix("dir://") if self.keystore.startswith("dir://") else self.keystore

    def to_env(self) -> dict[str, str]:
        """The environment that makes a `signer host` process use this configuration: the inverse of
        from_env. SIGNER_TRANSACTIONAL_ID is left out when empty (each process then derives its own);
        a setting no variable can carry (a non-default replication factor, channel back-off, ...) or a
        duration that is not a whole number of the variable's unit is a ConfigError, never dropped."""
        pool, channel, layout = self.pool, self.pool.channel, self.layout
        _only_defaults(layout, TopicLayout(), ("replication_factor",))
        _only_defaults(pool, PoolSettings(), ("backoff_min_s", "backoff_max_s"))
        _only_defaults(channel, ChannelSettings(), ("hello_timeout_s", "max_frame_bytes"))
        env = {
            "KAFKA_BOOTSTRAP": self.bootstrap,
            "SIGNER_ENCLAVES": ",".join(self.enclaves),
            "SIGNER_GROUP_ID": self.group_id,
            "SIGNER_TOPIC_REQUESTS": layout.requests,
            "SIGNER_TOPIC_RESULTS": layout.results,
            "SIGNER_TOPIC_DLQ": layout.dlq,
            "SIGNER_TOPIC_ADMIN": layout.admin,
            "SIGNER_TOPIC_ADMIN_REPLIES": layout.admin_replies,
            "SIGNER_REQUEST_PARTITIONS": str(layout.request_partitions),
            "SIGNER_RESULT_PARTITIONS": str(layout.result_partitions),
            "SIGNER_MAX_BATCH": str(self.max_batch),
            "SIGNER_HTTP_HOST": self.http_host,
            "SIGNER_HTTP_PORT": str(self.http_port),
            "SIGNER_CONNECTIONS_PER_ENCLAVE": str(pool.connections_per_enclave),
            "SIGNER_SPILL_AFTER": str(pool.spill_after),
            "SIGNER_POISON_ATTEMPTS": str(pool.poison_attempts),
            "SIGNER_FRAME_MAX_REQUESTS": str(channel.max_batch),
            "SIGNER_FRAME_MAX_BYTES": str(channel.max_batch_bytes),
            "SIGNER_BATCH_WINDOW_US": _whole("SIGNER_BATCH_WINDOW_US", channel.batch_window_s, 1_000_000),
            "SIGNER_HEARTBEAT_INTERVAL_MS": _whole("SIGNER_HEARTBEAT_INTERVAL_MS", channel.heartbeat_interval_s, 1000),
            "SIGNER_DEAD_AFTER_MS": _whole("SIGNER_DEAD_AFTER_MS", channel.dead_after_s, 1000),
            "SIGNER_ENCLAVE_WAIT_S": _whole("SIGNER_ENCLAVE_WAIT_S", self.enclave_wait_s, 1),
            "SIGNER_SHUTDOWN_TIMEOUT_S": _whole("SIGNER_SHUTDOWN_TIMEOUT_S", self.shutdown_timeout_s, 1),
            "SIGNER_KEYSTORE": self.keystore,
            "SIGNER_KEYSTORE_DIR": "",  # an inherited deprecated setting must not contradict SIGNER_KEYSTORE
            "SIGNER_PRELOAD_KEYS": str(self.preload_keys),
            "SIGNER_DEFAULT_KEYRING": self.default_keyring,
            "SIGNER_KMS_CREDENTIALS_FILE": self.kms_credentials_file,
            "SIGNER_MAX_IN_FLIGHT": str(self.max_in_flight),
            "SIGNER_RESUME_BELOW": str(self.resume_below),
            "SIGNER_COMMIT_INTERVAL_MS": _whole("SIGNER_COMMIT_INTERVAL_MS", self.commit_interval_s, 1000),
            "SIGNER_EXACTLY_ONCE": "true" if self.exactly_once else "false",
            "SIGNER_TRANSACTION_TIMEOUT_MS": str(self.transaction_timeout_ms),
            "SIGNER_SESSION_TIMEOUT_MS": str(self.session_timeout_ms),
            "SIGNER_REBALANCE_DRAIN_S": _whole("SIGNER_REBALANCE_DRAIN_S", self.rebalance_drain_s, 1),
        }
        if self.transactional_id:
            env["SIGNER_TRANSACTIONAL_ID"] = self.transactional_id
        return env


DEFAULT_KEYSTORE_DIR = "~/.local/share/enclave-signer/keystore"


def _keystore(environ: Mapping[str, str]) -> str:
    """SIGNER_KEYSTORE, checked; SIGNER_KEYSTORE_DIR=PATH (deprecated) stands for dir://PATH."""
    from .keystore import parse_url

    url = environ.get("SIGNER_KEYSTORE") or ""
    legacy = environ.get("SIGNER_KEYSTORE_DIR") or ""
    if legacy:
        path = os.path.abspath(os.path.expanduser(legacy))
        if url and url.strip() not in (f"dir://{path}", f"dir://{path}/"):
            raise ConfigError(f"SIGNER_KEYSTORE_DIR={legacy!r} (deprecated) and SIGNER_KEYSTORE={url!r} disagree: "
                              f"set only SIGNER_KEYSTORE")  # fmt: skip
        url = url or f"dir://{path}"
    url = url or f"dir://{os.path.expanduser(DEFAULT_KEYSTORE_DIR)}"
    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"SIGNER_KEYSTORE={url!r}: {exc}") from None
    return url


def _whole(name: str, seconds: float, per_second: int) -> str:
    """A duration in the variable's unit; refused if it is not a whole number of them."""
    value = seconds * per_second
    if abs(value - round(value)) > 1e-6:
        raise ConfigError(f"{name}: {seconds} s is not a whole number of the variable's unit")
    return str(round(value))


def _only_defaults(settings: object, defaults: object, names: tuple[str, ...]) -> None:
    for f in fields(settings):  # type: ignore[arg-type]
        if f.name in names and getattr(settings, f.name) != getattr(defaults, f.name):
            raise ConfigError(f"{type(settings).__name__}.{f.name} has no environment variable: only the default "
                              f"({getattr(defaults, f.name)!r}) can be passed to a host process")  # fmt: skip
