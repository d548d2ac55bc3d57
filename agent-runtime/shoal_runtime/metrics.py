"""Prometheus metrics of one runtime, in a registry of its own (several runtimes may
share a process in tests and benchmarks).

Label children are bound once: ``labels()`` on every task would cost more than the
no-op handler it measures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = (
    "succeeded",
    "failed",
    "dead_lettered",
    "forwarded",
    "cached",
    "duplicate",
    "handed_back",
)
CIRCUIT_VALUES = {"Closed": 0, "Open": 1, "HalfOpen": 2}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, namespace: str, agent: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("namespace", "agent")
        ids = (namespace, agent)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        tasks = Counter(
            "shoal_tasks", "Tasks by outcome", (*labels, "outcome"), registry=self.registry
        )
        self.outcome = {o: tasks.labels(*ids, o) for o in OUTCOMES}
        self._latency = Histogram(
            "shoal_task_duration_seconds",
            "Time from a task's delivery to its result, dead letter or hand-off",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(*ids)
        self.in_flight = gauge("shoal_tasks_in_flight", "Tasks being worked on").labels(*ids)
        self.queue_lag = gauge(
            "shoal_queue_lag", "Tasks waiting for this Agent as last seen by this replica"
        ).labels(*ids)
        self.retries = counter("shoal_retries", "Attempts that failed and were retried").labels(
            *ids
        )
        dead = Counter(
            "shoal_dead_letters",
            "Tasks dead-lettered, by reason",
            (*labels, "reason"),
            registry=self.registry,
        )
        self._dead = dead
        self._ids = ids
        self.circuit = gauge("shoal_circuit_state", "0 Closed, 1 Open, 2 HalfOpen").labels(*ids)
        self.cache_hits = counter("shoal_cache_hits", "Results served from the cache").labels(*ids)
        self.cache_misses = counter("shoal_cache_misses", "Cache lookups that missed").labels(*ids)
        tokens = Counter(
            "shoal_tokens", "LLM tokens used", (*labels, "kind"), registry=self.registry
        )
        self.input_tokens = tokens.labels(*ids, "input")
        self.output_tokens = tokens.labels(*ids, "output")
        self.cost = counter("shoal_cost", "Cost of LLM calls in the pricing's currency").labels(
            *ids
        )

    def observe(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def dead_letter(self, reason: str) -> None:
        self._dead.labels(*self._ids, reason).inc()
        self.outcome["dead_lettered"].inc()

    def set_circuit(self, state: str) -> None:
        self.circuit.set(CIRCUIT_VALUES.get(state, 0))
