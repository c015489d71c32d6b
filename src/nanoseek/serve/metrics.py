"""Prometheus metrics of the server, in a registry of its own (so two apps in one process do not collide).

Requests by endpoint and HTTP status, time to first token and inter-token latency histograms, prompt and
generated tokens, running and waiting requests and KV-cache use (read from the engine when scraped).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0)  # fmt: skip


class Metrics:
    def __init__(self, prefix: str = "nanoseek"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{prefix}_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.time_to_first_token = Histogram(f"{prefix}_time_to_first_token_seconds",
                                             "Time from a request's submission to its first token (per choice)",
                                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.inter_token_latency = Histogram(f"{prefix}_inter_token_latency_seconds",
                                             "Time between two consecutive tokens of a choice",
                                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generation_tokens = Counter(f"{prefix}_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge(f"{prefix}_requests_running", "Requests in the engine's running batch", registry=r)
        self.waiting = Gauge(f"{prefix}_requests_waiting", "Requests waiting for the engine", registry=r)
        self.kv_cache_usage = Gauge(f"{prefix}_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                                    registry=r)  # fmt: skip

    def watch_engine(self, engine) -> None:
        """Read the engine's queues and cache when scraped (len() of a list is safe from another thread)."""
        self.running.set_function(lambda: len(engine.scheduler.running))
        self.waiting.set_function(lambda: len(engine.scheduler.waiting))
        self.kv_cache_usage.set_function(lambda: engine.pool.usage)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
