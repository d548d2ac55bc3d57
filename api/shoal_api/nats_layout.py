"""Where Shoal's data lives in NATS: the one module naming subjects, streams and buckets.

Subjects carry namespace and Agent so that per-Agent NATS permissions are plain subject
grants. Namespaces and Agent names are DNS labels (no dots, no underscores), which keeps
every name below unambiguous.

- task for an Agent: ``shoal.task.<ns>.<agent>.<priority 0-9>``, stream ``SHOAL_TASKS``
  (work-queue retention)
- result of a task or run: ``shoal.result.<ns>.<id>``, stream ``SHOAL_RESULTS`` (limits)
- dead letter: ``shoal.dlq.<ns>.<agent>``, stream ``SHOAL_DLQ`` (limits)
- workflow run submission: ``shoal.run.<ns>.<workflow>``
- an Agent's durable consumer: ``<ns>_<agent>`` on ``SHOAL_TASKS``, filtered on its tasks
- KV buckets ``shoal-circuit``, ``shoal-cache``, ``shoal-runs``, ``shoal-usage``, keyed
  ``<ns>.<agent>[.<rest>]``; ``shoal-stats`` (entries expire after 30 s) holds each
  runtime pod's live figures at ``<ns>.<agent>.<pod>``
"""

from __future__ import annotations

TASKS_STREAM = "SHOAL_TASKS"
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
BUCKET_TTL_SECONDS = {STATS_BUCKET: 30}

PRIORITIES = range(10)


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


def consumer_name(namespace: str, agent: str) -> str:
    """The Agent's durable consumer on the tasks stream (no dots allowed in names)."""
    return f"{namespace}_{agent}"


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
