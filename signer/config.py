"""Host worker configuration: one place, environment variables with documented defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from broker.topics import TopicLayout


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
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg
