"""Host worker configuration: one place, environment variables with documented defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from broker.topics import TopicLayout

from .channel import ChannelSettings
from .pool import PoolSettings


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


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
    kms_key_id: str = ""
    default_keyring: str = "default"

    @classmethod
    def from_env(cls, **overrides: object) -> HostConfig:
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
                channel=ChannelSettings(
                    max_batch=_int("SIGNER_FRAME_MAX_REQUESTS", 512, 1),
                    max_batch_bytes=_int("SIGNER_FRAME_MAX_BYTES", 1024 * 1024, 1024),
                    batch_window_s=_int("SIGNER_BATCH_WINDOW_US", 500) / 1e6,
                    heartbeat_interval_s=_int("SIGNER_HEARTBEAT_INTERVAL_MS", 1000, 10) / 1000,
                    dead_after_s=_int("SIGNER_DEAD_AFTER_MS", 5000, 50) / 1000,
                ),
            ),
            enclave_wait_s=_int("SIGNER_ENCLAVE_WAIT_S", 30),
            shutdown_timeout_s=_int("SIGNER_SHUTDOWN_TIMEOUT_S", 30),
            keystore_dir=_env("SIGNER_KEYSTORE_DIR", os.path.expanduser("~/.local/share/enclave-signer/keystore")),
            kms_key_id=_env("SIGNER_KMS_KEY_ID", ""),
            default_keyring=_env("SIGNER_DEFAULT_KEYRING", "default"),
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg
