"""Prometheus metrics of the server, in their own registry (``GET /metrics``).

Names follow Prometheus conventions: ``harken_`` prefix, base units, ``_total`` counters,
histograms (not summaries), low-cardinality labels only (never a key, client, file or request id).
The table in docs/serving.md lists every metric and its labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "ENDPOINTS", "REJECT_REASONS", "AUDIO_FORMATS", "status_class", "CONTENT_TYPE_LATEST"]

ENDPOINTS = ("rest", "openai", "models", "requests", "ws", "grpc_unary", "grpc_stream", "other")
REJECT_REASONS = ("queue_full", "too_large", "too_long", "rate_limited", "unauthorized", "decode_error",
                  "timeout", "bad_request", "draining", "too_many_streams")
AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg", "webm", "mp4", "pcm", "other")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
AUDIO_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 3600, 10800)
RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


def status_class(status: int) -> str:
    return f"{max(1, min(5, int(status) // 100))}xx"


class Metrics:
    """Every ``harken_`` metric, registered in ``self.registry`` (one per server, so several apps in
    one process, as in tests, do not collide)."""

    def __init__(self, model: str = "", version: str = "", provider: str = "cpu", backend: str = ""):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.model = model
        self.requests = Counter("harken_requests", "Requests answered, by endpoint and status class",
                                ["endpoint", "status_class", "model"], registry=r)
        self.request_duration = Histogram("harken_request_duration_seconds", "End-to-end request latency",
                                          ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("harken_queue_wait_seconds", "Time an item waited in the batch queue",
                                    ["model"], buckets=FAST_BUCKETS, registry=r)
        self.batch_compute = Histogram("harken_batch_compute_seconds", "Engine time per batch",
                                       ["model", "kind"], buckets=FAST_BUCKETS, registry=r)
        self.batch_size = Histogram("harken_batch_size", "Items per batch", ["model", "kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.padding_ratio = Histogram("harken_batch_padding_ratio", "Padded samples wasted / total per batch",
                                       ["model"], buckets=RATIO_BUCKETS, registry=r)
        self.audio_duration = Histogram("harken_audio_duration_seconds", "Decoded audio duration per request",
                                        ["endpoint"], buckets=AUDIO_BUCKETS, registry=r)
        self.audio_seconds = Counter("harken_audio_seconds", "Seconds of audio transcribed",
                                     ["model", "endpoint"], registry=r)
        self.rtf = Histogram("harken_rtf", "Real-time factor per request (compute / audio seconds)", ["model"],
                             buckets=RTF_BUCKETS, registry=r)
        self.queue_depth = Gauge("harken_queue_depth", "Items waiting in the batch queue", ["model"], registry=r)
        self.inflight = Gauge("harken_inflight_requests", "Requests being processed", ["endpoint"], registry=r)
        self.streams_active = Gauge("harken_streams_active", "Open streaming sessions", ["protocol"], registry=r)
        self.stream_partial_latency = Histogram(
            "harken_stream_partial_latency_seconds", "Audio chunk received -> its partial result sent",
            ["protocol"], buckets=FAST_BUCKETS, registry=r)
        self.stream_final_latency = Histogram(
            "harken_stream_final_latency_seconds", "End of speech (or stop) -> final result sent",
            ["protocol"], buckets=FAST_BUCKETS, registry=r)
        self.rejected = Counter("harken_rejected", "Requests refused, by reason", ["reason"], registry=r)
        self.decode_failures = Counter("harken_decode_failures", "Uploads that could not be decoded, by format",
                                       ["format"], registry=r)
        self.model_loaded = Gauge("harken_model_loaded", "1 while the model is loaded and warm", ["model"],
                                  registry=r)
        self.build_info = Gauge("harken_build_info", "Build and model facts (value 1)",
                                ["version", "model", "backend", "provider"], registry=r)
        self.db_write_failures = Counter("harken_db_write_failures", "Recognition-log writes that failed",
                                         ["backend"], registry=r)
        self.db_write_seconds = Histogram("harken_db_write_seconds", "Recognition-log write time", ["backend"],
                                          buckets=FAST_BUCKETS, registry=r)
        self.build_info.labels(version=version, model=model, backend=backend, provider=provider).set(1)
        self.queue_depth.labels(model=model).set(0)
        for ep in ("rest", "openai"):
            self.inflight.labels(endpoint=ep).set(0)
        for proto in ("ws", "grpc"):
            self.streams_active.labels(protocol=proto).set(0)

    # small helpers used by the routes (labels kept in one place)
    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        ep = endpoint if endpoint in ENDPOINTS else "other"
        self.requests.labels(endpoint=ep, status_class=status_class(status), model=self.model).inc()
        self.request_duration.labels(endpoint=ep, model=self.model).observe(seconds)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason if reason in REJECT_REASONS else "bad_request").inc()

    def decode_failed(self, fmt: str) -> None:
        self.decode_failures.labels(format=fmt if fmt in AUDIO_FORMATS else "other").inc()

    def observe_audio(self, endpoint: str, seconds: float, compute_seconds: float | None = None) -> None:
        ep = endpoint if endpoint in ENDPOINTS else "other"
        self.audio_duration.labels(endpoint=ep).observe(seconds)
        self.audio_seconds.labels(model=self.model, endpoint=ep).inc(seconds)
        if compute_seconds is not None and seconds > 0:
            self.rtf.labels(model=self.model).observe(compute_seconds / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
