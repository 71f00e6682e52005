"""Host worker configuration: one place, environment variables with documented defaults."""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field

from broker.topics import TopicLayout

from .channel import ChannelSettings
from .pool import PoolSettings

_FILE_VALUES: dict[str, str] = {}


def load_config_file(path: str) -> None:
    """SIGNER_CONFIG_FILE: a TOML file of NAME = value pairs with the same names as the
    environment variables; the environment still wins."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    for k, v in data.items():
        if not isinstance(v, str | int | float | bool):
            raise ConfigError(f"{path}: {k} must be a string, number or boolean")
        _FILE_VALUES[k] = str(v).lower() if isinstance(v, bool) else str(v)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, _FILE_VALUES.get(name, default))


def _bool(name: str, default: bool) -> bool:
    raw = _env(name, "true" if default else "false").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (true/false)")


class ConfigError(ValueError):
    """A setting with a value the host cannot use; the message names the variable."""


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = _env(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def _int_at_most(name: str, default: int, minimum: int, maximum: int) -> int:
    value = _int(name, default, minimum)
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
    keystore_dir: str = ""
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
    def from_env(cls, **overrides: object) -> HostConfig:
        path = os.environ.get("SIGNER_CONFIG_FILE")
        if path:
            try:
                load_config_file(path)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"SIGNER_CONFIG_FILE={path}: {exc}") from None
        layout = TopicLayout(
            requests=_env("SIGNER_TOPIC_REQUESTS", "sign.requests"),
            results=_env("SIGNER_TOPIC_RESULTS", "sign.results"),
            dlq=_env("SIGNER_TOPIC_DLQ", "sign.dlq"),
            admin=_env("SIGNER_TOPIC_ADMIN", "sign.admin"),
            admin_replies=_env("SIGNER_TOPIC_ADMIN_REPLIES", "sign.admin.replies"),
            request_partitions=_int("SIGNER_REQUEST_PARTITIONS", 12, 1),
            result_partitions=_int("SIGNER_RESULT_PARTITIONS", 12, 1),
        )
        enclaves = [u.strip() for u in _env("SIGNER_ENCLAVES", "").split(",") if u.strip()]
        cfg = cls(
            bootstrap=_env("KAFKA_BOOTSTRAP", ""),
            enclaves=enclaves,
            group_id=_env("SIGNER_GROUP_ID", "signer-hosts"),
            layout=layout,
            max_batch=_int("SIGNER_MAX_BATCH", 500, 1),
            http_host=_env("SIGNER_HTTP_HOST", "127.0.0.1"),
            http_port=_int("SIGNER_HTTP_PORT", 9464),
            pool=PoolSettings(
                connections_per_enclave=_int("SIGNER_CONNECTIONS_PER_ENCLAVE", 2, 1),
                max_queued=_int("SIGNER_MAX_QUEUED", 20_000, 1),
                spill_after=_int("SIGNER_SPILL_AFTER", 1024, 1),
                poison_attempts=_int("SIGNER_POISON_ATTEMPTS", 3, 2),
                channel=ChannelSettings(
                    max_batch=_int("SIGNER_FRAME_MAX_REQUESTS", 512, 1),
                    max_batch_bytes=_int_at_most("SIGNER_FRAME_MAX_BYTES", 1024 * 1024, 1024, 1024 * 1024),
                    batch_window_s=_int("SIGNER_BATCH_WINDOW_US", 500) / 1e6,
                    heartbeat_interval_s=_int("SIGNER_HEARTBEAT_INTERVAL_MS", 1000, 10) / 1000,
                    dead_after_s=_int("SIGNER_DEAD_AFTER_MS", 5000, 50) / 1000,
                ),
            ),
            enclave_wait_s=_int("SIGNER_ENCLAVE_WAIT_S", 30),
            shutdown_timeout_s=_int("SIGNER_SHUTDOWN_TIMEOUT_S", 30),
            keystore_dir=_env("SIGNER_KEYSTORE_DIR", os.path.expanduser("~/.local/share/enclave-signer/keystore")),
            default_keyring=_env("SIGNER_DEFAULT_KEYRING", "default"),
            kms_credentials_file=_env("SIGNER_KMS_CREDENTIALS_FILE", ""),
            max_in_flight=_int("SIGNER_MAX_IN_FLIGHT", 10_000, 1),
            resume_below=_int("SIGNER_RESUME_BELOW", -1, -1),
            commit_interval_s=_int("SIGNER_COMMIT_INTERVAL_MS", 200, 1) / 1000,
            exactly_once=_bool("SIGNER_EXACTLY_ONCE", False),
            transactional_id=_env("SIGNER_TRANSACTIONAL_ID", f"signer-{socket.gethostname()}-{os.getpid()}"),
            transaction_timeout_ms=_int("SIGNER_TRANSACTION_TIMEOUT_MS", 60_000, 1000),
            session_timeout_ms=_int("SIGNER_SESSION_TIMEOUT_MS", 10_000, 1000),
            rebalance_drain_s=_int("SIGNER_REBALANCE_DRAIN_S", 20, 0),
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        if cfg.resume_below < 0:
            cfg.resume_below = cfg.max_in_flight // 2
        if cfg.resume_below >= cfg.max_in_flight:
            raise ConfigError(f"SIGNER_RESUME_BELOW={cfg.resume_below} must be below SIGNER_MAX_IN_FLIGHT")
        return cfg
