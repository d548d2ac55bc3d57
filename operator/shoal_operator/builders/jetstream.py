"""JetStream streams and the per-Agent durable consumers, as plain config dicts."""

from __future__ import annotations

from typing import Any

from shoal_api import nats_layout as nl
from shoal_api.agent import AgentSpec

# Extra ack-wait beyond the Agent's timeout: scheduling jitter and result publishing.
ACK_MARGIN_SECONDS = 30
DAY = 24 * 3600
MAX_RESULT_CONSUMERS = 100_000


NS_PER_SECOND = 1_000_000_000


def _ns(seconds: float) -> int:
    return round(seconds * NS_PER_SECOND)


def streams() -> list[dict[str, Any]]:
    """The streams Shoal needs, declared by the operator (JetStream API wire form)."""
    common = {"storage": "file", "discard": "old", "num_replicas": 1}
    return [
        {
            "name": nl.TASKS_STREAM,
            "subjects": [nl.TASK_SUBJECTS],
            "retention": "workqueue",
            "max_age": _ns(7 * DAY),
            # Every Agent holds one consumer per band here; the server's implicit cap
            # (1,000 per stream) held 333 Agents. Explicit, so an existing stream is
            # raised to it in place (see ensure_streams).
            "max_consumers": nl.TASKS_MAX_CONSUMERS,
            **common,
        },
        {
            "name": nl.RESULTS_STREAM,
            "subjects": [nl.RESULT_SUBJECTS],
            "retention": "limits",
            "max_age": _ns(DAY),
            # Runtimes look a workflow step's result up before running it: a direct get
            # is answered without a JetStream API round of its own.
            "allow_direct": True,
            # Every waiting client holds a short-lived consumer; the server's implicit
            # cap (1,000 per stream) would refuse busy callers.
            "max_consumers": MAX_RESULT_CONSUMERS,
            **common,
        },
        {
            "name": nl.DLQ_STREAM,
            "subjects": [nl.DLQ_SUBJECTS],
            "retention": "limits",
            "max_age": _ns(7 * DAY),
            **common,
        },
    ]


def consumers(namespace: str, agent: str, spec: AgentSpec, replicas: int) -> list[dict[str, Any]]:
    """The Agent's durable pull consumers, one per priority band (:data:`nl.BANDS`), the
    same but for name and filter. The band keeping the Agent's original consumer name
    comes first: declared in this order, a consumer from before bands existed (filtered
    on all priorities) is narrowed before the others appear, as JetStream refuses
    overlapping filters on a work-queue stream."""
    order = sorted(nl.BANDS, key=lambda b: b.name != nl.NAMED_BAND)
    return [consumer(namespace, agent, spec, replicas, band) for band in order]


def consumer(
    namespace: str, agent: str, spec: AgentSpec, replicas: int, band: nl.Band
) -> dict[str, Any]:
    """One band's durable pull consumer (JetStream API wire form: durations in ns).

    - backoff[i] is how long attempt i+1 may stay unacknowledged before JetStream
      redelivers: the Agent's timeout plus a margin (runtimes heartbeat longer work)
      plus the retry delay. JetStream takes ack_wait from backoff[0].
    - max_deliver is attempts + 1: a task whose last attempt died with its worker is
      delivered once more, and the runtime dead-letters it instead of losing it.
    - max_ack_pending bounds work in flight: concurrency x the most replicas. Per band,
      as a runtime may spend all of its concurrency on one band.
    """
    attempt = spec.timeout_seconds + ACK_MARGIN_SECONDS
    backoff = [_ns(attempt + d) for d in spec.retry.delays()]
    return {
        "durable_name": nl.consumer_name(namespace, agent, band.name),
        "filter_subjects": nl.band_task_subjects(namespace, agent, band),
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "replay_policy": "instant",
        "ack_wait": backoff[0],
        "max_deliver": spec.retry.max_attempts + 1,
        "backoff": backoff,
        "max_ack_pending": spec.concurrency * max(1, replicas),
        "max_waiting": 512,
    }
