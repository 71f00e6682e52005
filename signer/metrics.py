"""Host metrics (Prometheus), all under the `signer_` prefix. See docs/metrics.md."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class HostMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "signer_requests", "Sign requests finished, by scheme and result status",
            ["scheme", "status"], registry=r,
        )  # fmt: skip
        self.dlq = Counter("signer_dlq_records", "Inputs sent to the DLQ, by reason", ["reason"], registry=r)
        self.stage = Histogram(
            "signer_stage_seconds", "Time spent per pipeline stage", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "signer_frame_batch_size", "Requests per frame sent to an enclave",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("signer_in_flight", "Requests consumed and not yet committed", registry=r)
        self.reconnects = Counter("signer_channel_reconnects", "Channel reconnects", registry=r)
        self.redispatched = Counter(
            "signer_redispatched_requests", "Requests re-dispatched after their connection was lost", registry=r
        )
        self.frames = Counter(
            "signer_channel_frames", "Frames over enclave channels", ["direction", "channel"], registry=r
        )
        self.frame_bytes = Counter(
            "signer_channel_frame_bytes", "Frame bytes over enclave channels", ["direction", "channel"], registry=r
        )
        self.credits = Gauge("signer_channel_credits", "Credits available per channel", ["channel"], registry=r)
        self.enclaves_connected = Gauge(
            "signer_enclaves_connected", "Enclaves with at least one live channel", registry=r
        )
