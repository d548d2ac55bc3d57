"""Where Shoal's data lives in NATS: the one module naming subjects, streams and buckets.

Subjects carry namespace and Agent so that per-Agent NATS permissions are plain subject
grants. Namespaces and Agent names are DNS labels (no dots, no underscores), which keeps
every name below unambiguous.

- task for an Agent: ``shoal.task.<ns>.<agent>.<priority 0-9>``, stream ``SHOAL_TASKS``
  (work-queue retention)
- result of a task or run: ``shoal.result.<ns>.<id>``, stream ``SHOAL_RESULTS`` (limits)
- dead letter: ``shoal.dlq.<ns>.<agent>``, stream ``SHOAL_DLQ`` (limits)
- workflow run submission: ``shoal.run.<ns>.<workflow>``
- an Agent's durable consumers on ``SHOAL_TASKS``: one per priority band (see
  :data:`BANDS`), ``<ns>_<agent>_<band>``, except the normal band's ``<ns>_<agent>``
- ``SHOAL_TASKS`` is declared with an explicit consumer capacity,
  :data:`TASKS_MAX_CONSUMERS` (:data:`FLEET_AGENTS` Agents x their
  :data:`CONSUMERS_PER_AGENT` bands). Never -1: nats-server replaces -1 with its
  ``default_max_consumers`` (1,000 per stream in 2.15), which held only 333 Agents. An
  existing stream is raised to it in place (a stream update keeps messages and
  consumers).

Measured with nats-server 2.15.1 (``bench/jetstream_scale.py``, README "NATS and
JetStream at fleet scale"): a band consumer costs ~54 KiB of server memory (~160 KiB an
Agent, ~1.6 GiB for 10,000) and next to no idle CPU. Creating one costs more the more
consumers the work-queue stream already has (8 ms an Agent at 200 Agents, ~200 ms at
2,000 on 2 shared cores), so declaring a whole fleet from nothing on one stream grows
superlinearly; it is paid once per Agent (re-declaring an existing consumer is a lookup,
~1.3 ms an Agent).
- the workflow dispatcher's durable consumer on ``SHOAL_RESULTS``: ``shoal-dispatcher``
- KV buckets ``shoal-circuit``, ``shoal-cache``, ``shoal-runs``, ``shoal-usage``, keyed
  ``<ns>.<agent>[.<rest>]``; ``shoal-stats`` (entries expire after 30 s) holds each
  runtime pod's live figures at ``<ns>.<agent>.<pod>``; ``shoal-runs`` holds each workflow
  run's record at ``<ns>.<run>`` (see :mod:`shoal_api.runs.wire`; kept 31 days)
"""

from __future__ import annotations

from dataclasses import dataclass

TASKS_STREAM = "SHOAL_TASKS"
DISPATCHER_CONSUMER = "shoal-dispatcher"
RESULTS_STREAM = "SHOAL_RESULTS"
DLQ_STREAM = "SHOAL_DLQ"

TASK_SUBJECTS = "shoal.task.>"
RESULT_SUBJECTS = "shoal.result.>"
DLQ_SUBJECTS = "shoal.dlq.>"

CIRCUIT_BUCKET = "shoal-circuit"
CACHE_BUCKET = "shoal-cache"
RUNS_BUCKET = "shoal-runs"
USAGE_BUCKET = "shoal-usage"
STATS_BUCKET = "shoal-stats"
BUCKETS = (CIRCUIT_BUCKET, CACHE_BUCKET, RUNS_BUCKET, USAGE_BUCKET, STATS_BUCKET)
# Entries expire on their own: a pod that stopped reporting stops counting.
# A run record outlives the longest run (deadlineSeconds <= 30 days, and every change
# rewrites the record), then expires with everything it holds.
RUN_RECORD_TTL_SECONDS = 31 * 24 * 3600
BUCKET_TTL_SECONDS = {STATS_BUCKET: 30, RUNS_BUCKET: RUN_RECORD_TTL_SECONDS}

PRIORITIES = range(10)


@dataclass(frozen=True)
class Band:
    """Priorities an Agent's runtimes serve together, from one durable consumer."""

    name: str
    priorities: range
    weight: int
    """This band's share of the runtime's capacity while other bands have work too:
    ``weight / sum(weights of the bands with work)``. A band alone gets it all."""


# Highest first, the order the runtimes drain them. With every band backlogged, of each
# 10 tasks taken about 7 are high, 2 normal and 1 low: high wins clearly, yet a low task
# still runs within ~10 (no starvation). Within a band, tasks go in arrival order.
# JetStream refuses overlapping consumers on a work-queue stream, so the ranges must
# partition PRIORITIES.
BANDS = (
    Band("high", range(7, 10), 7),
    Band("normal", range(4, 7), 2),
    Band("low", range(0, 4), 1),
)
CONSUMERS_PER_AGENT = len(BANDS)
# The fleet one SHOAL_TASKS stream is declared for: room for 20,000 Agents' bands, twice
# the 10,000 benchmarked on one server (~1.6 GiB of nats-server memory). Raising it is a
# stream update; the server's memory, not this number, is the real bound.
FLEET_AGENTS = 20_000
TASKS_MAX_CONSUMERS = FLEET_AGENTS * CONSUMERS_PER_AGENT

# Keeps the Agent's original consumer name: the default priority (5) is in it, so a
# consumer declared before bands existed is narrowed in place rather than replaced.
NAMED_BAND = "normal"


def task_subject(namespace: str, agent: str, priority: int) -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority} is not in 0..9")
    return f"shoal.task.{namespace}.{agent}.{priority}"


def agent_task_filter(namespace: str, agent: str) -> str:
    """All priorities of one Agent's tasks."""
    return f"shoal.task.{namespace}.{agent}.*"


def result_subject(namespace: str, task_or_run: str) -> str:
    return f"shoal.result.{namespace}.{task_or_run}"


def dlq_subject(namespace: str, agent: str) -> str:
    return f"shoal.dlq.{namespace}.{agent}"


def run_subject(namespace: str, workflow: str) -> str:
    return f"shoal.run.{namespace}.{workflow}"


def band_of(priority: int) -> Band:
    for band in BANDS:
        if priority in band.priorities:
            return band
    raise ValueError(f"priority {priority} is not in 0..9")


def band_task_subjects(namespace: str, agent: str, band: Band) -> list[str]:
    """The subjects of one band of the Agent's tasks (its consumer's filter)."""
    return [task_subject(namespace, agent, p) for p in band.priorities]


def consumer_name(namespace: str, agent: str, band: str = NAMED_BAND) -> str:
    """One of the Agent's durable consumers on the tasks stream, by band (no dots are
    allowed in names; DNS labels have no underscores, so the parts stay apart)."""
    base = f"{namespace}_{agent}"
    return base if band == NAMED_BAND else f"{base}_{band}"


def consumer_names(namespace: str, agent: str) -> list[str]:
    """All of the Agent's durable consumers, in drain order (:data:`BANDS`)."""
    return [consumer_name(namespace, agent, b.name) for b in BANDS]


def agent_key(namespace: str, agent: str) -> str:
    """The KV key of an Agent's entry (circuit state, usage); a prefix for its cache."""
    return f"{namespace}.{agent}"


def cache_key(namespace: str, agent: str, digest: str) -> str:
    """A cached result: below the Agent's key, so removing the Agent purges it."""
    return f"{namespace}.{agent}.{digest}"


def limiter_key(namespace: str, agent: str, kind: str) -> str:
    """A shared rate-limit window (``tasks`` per second, ``tokens`` per minute) in the
    usage bucket."""
    return f"{namespace}.{agent}.{kind}"


def stats_key(namespace: str, agent: str, pod: str) -> str:
    """A runtime pod's live figures (in flight, latency) in the stats bucket."""
    return f"{namespace}.{agent}.{pod}"
