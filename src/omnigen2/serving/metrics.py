"""Prometheus metrics of one server, in a registry of its own (``GET /metrics``, text exposition format)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The routes metrics are labelled with; anything else counts as "other" (bounded label values).
ENDPOINTS = (
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, scheduler):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "omnigen2_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "omnigen2_request_duration_seconds",
            "Time from a request's arrival to its last byte, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("omnigen2_requests_in_flight", "HTTP requests being answered", registry=r)
        self.queue_depth = Gauge("omnigen2_queue_depth", "Model calls waiting behind the running one", registry=r)
        self.queue_depth.set_function(lambda: scheduler.depth)
        self.running = Gauge("omnigen2_model_calls_running", "Model calls running (0 or 1)", registry=r)
        self.running.set_function(lambda: scheduler.busy)
        self.images = Counter("omnigen2_images_generated", "Images returned, chat drawings included", registry=r)
        self.tokens = Counter("omnigen2_tokens_generated", "Tokens of chat answers returned", registry=r)
        self.cancelled = Counter(
            "omnigen2_requests_cancelled",
            "Model calls dropped from the queue or stopped mid-run, by reason",
            ["reason"],
            registry=r,
        )
        for endpoint in (*ENDPOINTS, "other"):  # export zeros, so that sums are defined before the first request
            self.latency.labels(endpoint)
        for reason in ("disconnect", "timeout"):
            self.cancelled.labels(reason)

    @staticmethod
    def endpoint(path: str) -> str:
        if path.startswith("/v1/models"):
            return "/v1/models"
        return path if path in ENDPOINTS else "other"

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
