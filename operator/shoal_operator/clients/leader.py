"""Leader election on a coordination.k8s.io Lease, as client-go does it.

Every operator replica watches and keeps its cache warm; only the leader reconciles.
A standby takes over when the leader's Lease has not been renewed for a lease duration,
measured on the standby's own clock (no trust in clock sync between nodes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from shoal_api.timestamps import micro_time
from shoal_operator.clients.kube import Kube, is_status

log = logging.getLogger(__name__)


@dataclass
class LeaderElector:
    kube: Kube
    namespace: str
    identity: str
    name: str = "shoal-operator-leader"
    lease_seconds: float = 15.0
    renew_seconds: float = 5.0
    leading: asyncio.Event = field(default_factory=asyncio.Event)
    _observed: tuple[str, float] = ("", 0.0)  # (resourceVersion, when we first saw it)

    def is_leader(self) -> bool:
        return self.leading.is_set()

    def _lease(self, transitions: int, acquired: str) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_seconds),
                "acquireTime": acquired,
                "renewTime": micro_time(),
                "leaseTransitions": transitions,
            },
        }

    async def try_acquire_or_renew(self) -> bool:
        current = await self.kube.get("Lease", self.namespace, self.name)
        if current is None:
            body = self._lease(0, micro_time())
            try:
                await self.kube.create("Lease", self.namespace, body)
            except Exception as exc:
                if is_status(exc, 409):
                    return False
                raise
            return True
        spec = current.get("spec", {})
        rv = current["metadata"]["resourceVersion"]
        if rv != self._observed[0]:
            self._observed = (rv, time.monotonic())
        holder = spec.get("holderIdentity")
        expired = time.monotonic() - self._observed[1] > spec.get(
            "leaseDurationSeconds", self.lease_seconds
        )
        if holder not in (self.identity, None, "") and not expired:
            return False
        transitions = int(spec.get("leaseTransitions", 0))
        acquired = spec.get("acquireTime") or micro_time()
        if holder != self.identity:
            transitions, acquired = transitions + 1, micro_time()
        body = self._lease(transitions, acquired)
        body["metadata"]["resourceVersion"] = rv  # optimistic: lose the race, not the lease
        try:
            await self.kube.replace("Lease", self.namespace, self.name, body)
        except Exception as exc:
            if is_status(exc, 409):
                return False
            raise
        return True

    async def run(self) -> None:
        while True:
            try:
                leader = await self.try_acquire_or_renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leader election: %s", exc)
                leader = False
            if leader and not self.leading.is_set():
                log.info("became the leader (%s)", self.identity)
                self.leading.set()
            elif not leader and self.leading.is_set():
                log.warning("lost leadership; standing by")
                self.leading.clear()
            await asyncio.sleep(self.renew_seconds if leader else self.renew_seconds / 2)

    async def release(self) -> None:
        """Hands the Lease back on shutdown so a standby takes over at once."""
        if not self.leading.is_set():
            return
        self.leading.clear()
        current = await self.kube.get("Lease", self.namespace, self.name)
        if current and current.get("spec", {}).get("holderIdentity") == self.identity:
            await self.kube.delete("Lease", self.namespace, self.name)
