"""Prometheus metrics of the workflow dispatcher: what a platform team graphs and alerts
on (runs by outcome, how long they take, how fast steps are handed on, queues), in a
registry of its own so tests and benchmarks can run several dispatchers in a process.

Served by the operator on ``SHOAL_OPERATOR_METRICS_PORT`` (default 9090, 0 turns it
off) at ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DISPATCH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400, 86400)
WF_LABELS = ("namespace", "workflow")


class _Queues(Collector):
    """Active and queued runs per Workflow, read from the dispatcher at scrape time."""

    def __init__(self, source: Callable[[], Mapping[tuple[str, str], tuple[int, int]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily("shoal_workflow_runs_active", "Runs executing", labels=WF_LABELS)
        queued = GaugeMetricFamily(
            "shoal_workflow_runs_queued",
            "Runs waiting for a slot (maxConcurrentRuns)",
            labels=WF_LABELS,
        )
        for (ns, wf), (running, waiting) in sorted(self.source().items()):
            active.add_metric([ns, wf], running)
            queued.add_metric([ns, wf], waiting)
        yield active
        yield queued


class RunMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.submissions = Counter(
            "shoal_workflow_submissions",
            "Run submissions by outcome: Created, Existing (idempotency key or retry), or "
            "the refusal's code (WorkflowNotFound, InvalidInput, ...)",
            (*WF_LABELS, "outcome"),
            registry=self.registry,
        )
        self.finished = Counter(
            "shoal_workflow_runs",
            "Finished runs by phase (Succeeded, Failed) and reason",
            (*WF_LABELS, "phase", "reason"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "shoal_workflow_run_duration_seconds",
            "From a run's start to its end",
            WF_LABELS,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.dispatch = Histogram(
            "shoal_workflow_dispatch_seconds",
            "From a step's result reaching the dispatcher to the tasks it frees being "
            "stored and the run's record written",
            buckets=DISPATCH_BUCKETS,
            registry=self.registry,
        )
        self.conflicts = Counter(
            "shoal_workflow_record_conflicts",
            "Compare-and-set conflicts on run records (another writer came first)",
            registry=self.registry,
        )

    def watch_queues(self, source: Callable[[], Mapping[tuple[str, str], tuple[int, int]]]) -> None:
        self.registry.register(_Queues(source))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
