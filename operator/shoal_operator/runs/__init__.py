"""Workflow runs in the operator: the dispatcher and what it is made of.

Why a package: the dispatcher is the operator's hot path (NATS only, no Kubernetes API)
and its correctness rests on a few ordering rules (publish before store, acknowledge
after store, one compare-and-set per change). Those rules live in :mod:`.dispatcher`;
everything else it needs is a module with one reason to change:

- :mod:`.catalog`: the narrow view of Workflows and Agents it routes by;
- :mod:`.store`: the run records in KV, the only reader and writer of them;
- :mod:`.admission`: what a submission may start;
- :mod:`.slots`: queues, ``maxConcurrentRuns`` slots and tallies (no I/O);
- :mod:`.tasks`: tasks out (routing selector steps), results in;
- :mod:`.timers`: deadlines and approval timeouts;
- :mod:`.recovery`: rebuilding from the records, catching up on lost results;
- :mod:`.gate`: how the controller relays Approvals (a protocol);
- :mod:`.metrics`: the dispatcher's Prometheus metrics.

The package imports neither kopf nor the controller nor a Kubernetes client (an
import-linter contract): the controller uses it, never the other way round.
"""

from shoal_operator.runs.catalog import Catalog, WorkflowView, view_of
from shoal_operator.runs.dispatcher import Dispatcher
from shoal_operator.runs.gate import DecideOutcome, RunGate
from shoal_operator.runs.metrics import RunMetrics
from shoal_operator.runs.slots import Tally
from shoal_operator.runs.store import RunGone
from shoal_operator.runs.tasks import LagSource

__all__ = [
    "Catalog",
    "DecideOutcome",
    "Dispatcher",
    "LagSource",
    "RunGate",
    "RunGone",
    "RunMetrics",
    "Tally",
    "WorkflowView",
    "view_of",
]
