"""Host metrics (Prometheus), all under the `signer_` prefix. See docs/metrics.md."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class _Series:
    __slots__ = ("counts", "total")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.total = 0.0


class StageHistogram(Collector):
    """A latency (or size) histogram for the hot path, fed in batches.

    prometheus_client's Histogram takes a lock and a label lookup per observation
    (~7 us with labels); on the channel that cost more than moving the request.
    This keeps plain bucket counts per label set, updated by one event-loop thread,
    and exports them as a normal Prometheus histogram.
    """

    def __init__(
        self,
        name: str,
        doc: str,
        labels: str | tuple[str, ...],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ):
        self.name, self.doc = name, doc
        self.labels = (labels,) if isinstance(labels, str) else labels
        self.bounds = list(buckets)
        self._series: dict[tuple[str, ...], _Series] = {}
        registry.register(self)

    def series(self, *values: str) -> _Series:
        s = self._series.get(values)
        if s is None:
            s = self._series[values] = _Series(len(self.bounds) + 1)
        return s

    def observe(self, value: str | tuple[str, ...], seconds: float) -> None:
        s = self.series(*((value,) if isinstance(value, str) else value))
        s.counts[bisect_left(self.bounds, seconds)] += 1
        s.total += seconds

    def observe_n(self, value: str | tuple[str, ...], seconds: float, n: int) -> None:
        """The same observation n times (e.g. one wait shared by a whole batch)."""
        if n > 0:
            s = self.series(*((value,) if isinstance(value, str) else value))
            s.counts[bisect_left(self.bounds, seconds)] += n
            s.total += seconds * n

    def observe_many(self, value: str | tuple[str, ...], seconds: Iterable[float]) -> None:
        s = self.series(*((value,) if isinstance(value, str) else value))
        counts, bounds = s.counts, self.bounds
        for x in seconds:
            counts[bisect_left(bounds, x)] += 1
            s.total += x

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        for values, s in sorted(self._series.items()):
            fam.add_metric(list(values), cumulative_buckets(self.bounds, s.counts), s.total)
        yield fam


def cumulative_buckets(bounds: list[float], counts: list[int]) -> list[tuple[str, float]]:
    cumulative = 0
    out: list[tuple[str, float]] = []
    for bound, c in zip([*bounds, float("inf")], counts, strict=True):
        cumulative += c
        out.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return out


class HostMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "signer_requests", "Sign requests finished, by scheme and result status",
            ["scheme", "status"], registry=r,
        )  # fmt: skip
        self.dlq = Counter("signer_dlq_records", "Inputs sent to the DLQ, by reason", ["reason"], registry=r)
        self.stage = StageHistogram(
            "signer_stage_seconds", "Time spent per pipeline stage", "stage", _LATENCY_BUCKETS, r
        )
        self.batch_size = StageHistogram(
            "signer_frame_batch_size", "Requests per sign frame, per channel", "channel",
            (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), r,
        )  # fmt: skip
        self.channel_stage = StageHistogram(
            "signer_channel_stage_seconds",
            "Per-enclave stages: credit_wait (queued on a connection), channel_transfer (round trip minus "
            "enclave service), enclave_service",
            ("enclave", "stage"), _LATENCY_BUCKETS, r,
        )  # fmt: skip
        self.consumer_lag = Gauge(
            "signer_consumer_lag", "Records on assigned partitions not yet committed (log end - committed)",
            ["topic"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("signer_in_flight", "Records fetched whose output is not yet written", registry=r)
        self.paused_partitions = Gauge("signer_paused_partitions", "Partitions paused by backpressure", registry=r)
        self.reconnects = Counter("signer_channel_reconnects", "Channel reconnects", registry=r)
        self.redispatched = Counter(
            "signer_redispatched_requests", "Requests re-dispatched after their connection was lost", registry=r
        )
        self.poison_requests = Counter(
            "signer_poison_requests",
            "Requests refused as poison (in flight on SIGNER_POISON_ATTEMPTS lost enclave connections), by how the "
            "last connection was lost: closed, hung, error",
            ["reason"], registry=r,
        )  # fmt: skip
        self.spilled = Counter(
            "signer_spilled_requests", "Requests sent to a less loaded enclave than their keyring's", registry=r
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


class EnclaveStatsCollector(Collector):
    """Exports the counters each enclave reports over its channel (it has no network of its own)."""

    COUNTERS = {
        "kms_calls": "KMS requests made by the enclave (all operations, retries included)",
        "kms_throttles": "KMS ThrottlingException answers",
        "kms_decrypt": "KMS Decrypt calls for keyring unwraps",
        "kms_generate_data_key": "KMS GenerateDataKey calls (new keyrings and rotations)",
        "unwraps": "Keyring data keys unwrapped",
        "unwrap_joined": "Requests that joined an unwrap already in flight (single-flight)",
        "unwrap_keys": "Wallet keys made usable by unwraps (divided by unwraps: keys per KMS call)",
        "cache_hits": "Data key cache hits",
        "cache_misses": "Data key cache misses",
        "cache_evictions": "Data keys evicted (and wiped)",
        "keys_evicted": "Sealed key records let go (least recently used, past ENCLAVE_MAX_KEYS or _BYTES)",
        "opened_evicted": "Opened wallet keys let go (least recently used, past ENCLAVE_MAX_OPEN_KEYS)",
    }
    GAUGES = {
        "cache_entries": "Data keys cached",
        "keys_loaded": "Sealed key records held",
        "key_bytes": "Bytes of sealed key records held (as ENCLAVE_MAX_KEY_BYTES counts them)",
        "keys_opened": "Opened wallet keys kept",
    }

    def __init__(self, source: Callable[[], dict[str, dict[str, Any]]], registry: CollectorRegistry) -> None:
        self._source = source  # enclave_id -> latest stats
        registry.register(self)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._source()
        for name, doc in self.COUNTERS.items():
            fam = CounterMetricFamily(f"signer_enclave_{name}", doc, labels=["enclave"])
            for enclave, values in sorted(stats.items()):
                if name in values:
                    fam.add_metric([enclave], float(values[name]))
            yield fam
        for name, doc in self.GAUGES.items():
            g = GaugeMetricFamily(f"signer_enclave_{name}", doc, labels=["enclave"])
            for enclave, values in sorted(stats.items()):
                if name in values:
                    g.add_metric([enclave], float(values[name]))
            yield g
        h = HistogramMetricFamily(
            "signer_enclave_unwrap_seconds",
            "Keyring unwrap latency inside the enclave (attestation + KMS + CMS)",
            labels=["enclave"],
        )
        for enclave, values in sorted(stats.items()):
            hist = values.get("unwrap_hist")
            if isinstance(hist, dict) and len(hist.get("counts", [])) == len(hist.get("bounds", [])) + 1:
                h.add_metric(
                    [enclave], cumulative_buckets(list(hist["bounds"]), list(hist["counts"])), float(hist["sum"])
                )
        yield h
