"""Liveness that notices a stalled watch.

Every operator replica renews a Lease of its own and watches it come back through the
same watch machinery as its resources. If renewals stop arriving, the watch pipeline
(or the API connection) is stuck and the liveness probe fails, so the kubelet restarts
the pod instead of leaving a silent operator in charge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from shoal_api.timestamps import micro_time
from shoal_operator.clients.kube import Kube

log = logging.getLogger(__name__)

HEARTBEAT_LABEL = "shoal.dev/heartbeat"


@dataclass
class Heartbeat:
    namespace: str
    name: str
    interval: float = 10.0
    tolerance: int = 6
    """Missed intervals before the watch counts as stalled."""
    last_seen: float = field(default_factory=time.monotonic)

    def seen(self) -> None:
        self.last_seen = time.monotonic()

    def stalled_for(self, now: float) -> float | None:
        """Seconds the watch has been silent beyond tolerance, or None when healthy."""
        silent = now - self.last_seen
        return silent if silent > self.interval * self.tolerance else None

    def lease(self) -> dict[str, object]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {HEARTBEAT_LABEL: "true"},
            },
            "spec": {
                "holderIdentity": self.name,
                "renewTime": micro_time(),
                "leaseDurationSeconds": int(self.interval * self.tolerance),
            },
        }

    async def run(self, kube: Kube) -> None:
        while True:
            try:
                await kube.apply(self.lease())
            except Exception as exc:
                log.warning("heartbeat lease renewal failed: %s", exc)
            await asyncio.sleep(self.interval)
