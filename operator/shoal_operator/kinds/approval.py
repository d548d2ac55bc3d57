"""The Approval relay: a person's decision taken to its run, once, and the outcome
written to the Approval's status.

Not a work-queue reconcile: an Approval is acted on once and never revisited, and the
relay must not decide twice (a replica taking over, a status write that failed after
the run took the decision). Approvals that cannot be relayed yet (no dispatcher, not
leading, NATS trouble) wait here and are tried again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from shoal_api.approval import ApprovalSpec, ApprovalStatus
from shoal_api.base import status_patch
from shoal_api.timestamps import now_rfc3339
from shoal_operator.clients.kube import ApiError, Kube
from shoal_operator.clients.leader import LeaderElector
from shoal_operator.reconcilers import approval as approval_rec
from shoal_operator.runs import RunGate
from shoal_operator.status_conditions import EventSpec
from shoal_operator.writer import RetryLater, api_reason, validation_message

log = logging.getLogger(__name__)

# Approvals that could not be relayed are tried again this often; there are few of
# them, written by people.
APPROVAL_RETRY_SECONDS = 2.0
DECIDE_TIMEOUT_SECONDS = 30.0


def _status(body: Mapping[str, Any]) -> ApprovalStatus | None:
    raw = body.get("status")
    if not raw:
        return None
    try:
        return ApprovalStatus.model_validate(raw)
    except ValidationError:
        pass
    try:  # a status written by hand: its phase still says whether it is done
        return ApprovalStatus.model_validate({"phase": raw.get("phase")})
    except ValidationError:
        return None


@dataclass
class ApprovalRelay:
    kube: Kube
    leader: LeaderElector | None = None
    """None: a single replica, always in charge."""
    runs: RunGate | None = None
    """Takes Approvals' decisions to runs; None until the run dispatcher starts."""
    clock: Callable[[], str] = now_rfc3339
    _waiting: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    _busy: set[tuple[str, str]] = field(default_factory=set)
    # uid -> the status a relay computed but could not write yet (never decide twice).
    _results: dict[str, tuple[ApprovalStatus, list[EventSpec]]] = field(default_factory=dict)

    def _leading(self) -> bool:
        return self.leader is None or self.leader.is_leader()

    async def on_approval(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        """Relays an Approval's decision to its run, once, and records the outcome in its
        status. Until a run gate exists (or while another replica leads) it waits."""
        key = (namespace, name)
        if body is None or approval_rec.relayed(_status(body)):
            self._waiting.pop(key, None)
            return
        if key in self._busy:
            self._waiting[key] = body  # looked at again once the relay is done
            return
        self._busy.add(key)
        try:
            await self._relay(key, body)
        finally:
            self._busy.discard(key)

    async def _relay(self, key: tuple[str, str], body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        uid, generation = str(meta["uid"]), int(meta.get("generation", 0))
        current = _status(body) or ApprovalStatus()
        result = self._results.get(uid)
        if result is None:
            runs, leading = self.runs, self._leading()
            if runs is None or not leading:
                self._waiting[key] = body
                # Standbys have no dispatcher by design; only the leader says it waits.
                if leading and current.phase != "Pending":
                    pending = approval_rec.waiting_status(generation, current, self.clock())
                    try:
                        await self._write(body, pending)
                    except Exception as exc:  # cosmetic; the relay itself is retried
                        log.warning("approval %s/%s: %s", *key, api_reason(exc))
                return
            try:
                spec = ApprovalSpec.model_validate(body.get("spec") or {})
            except ValidationError as exc:
                result = approval_rec.status(
                    generation, None, "InvalidSpec", validation_message(exc), current, self.clock()
                )
            else:
                event = approval_rec.decision_event(spec, str(meta["creationTimestamp"]))
                try:
                    outcome, message = await asyncio.wait_for(
                        runs.decide(key[0], spec.run, event, workflow=spec.workflow),
                        DECIDE_TIMEOUT_SECONDS,
                    )
                except Exception as exc:
                    log.warning("approval %s/%s: relaying failed (%s); retrying", *key, exc)
                    self._waiting[key] = body
                    return
                result = approval_rec.status(
                    generation, spec, outcome, message, current, self.clock()
                )
            self._results[uid] = result
        status, events = result
        try:
            written = await self._write(body, status)
        except Exception as exc:
            log.warning("approval %s/%s: status not written (%s); retrying", *key, api_reason(exc))
            self._waiting[key] = body
            return
        self._results.pop(uid, None)
        self._waiting.pop(key, None)
        if not written:
            return  # deleted, or somebody recorded an outcome first
        for ev in events:
            try:
                await self.kube.event(dict(body), ev.type, ev.reason, ev.message)
            except Exception as exc:  # an Event is best effort, never worth a retry
                log.warning("posting event %s failed: %s", ev.reason, api_reason(exc))

    async def _write(self, body: Mapping[str, Any], status: ApprovalStatus) -> bool:
        """Writes ``status`` unless the Approval is gone or already shows an outcome.
        The resourceVersion precondition keeps two writers (a replica taking over, a late
        retry) from overwriting an outcome with another one."""
        meta = body["metadata"]
        namespace, name, version = meta["namespace"], meta["name"], meta.get("resourceVersion")
        for _ in range(5):
            patch = {"metadata": {"resourceVersion": version}, **status_patch(status)}
            try:
                await self.kube.merge_patch("Approval", namespace, name, patch, sub="status")
                return True
            except ApiError as exc:
                if exc.status != 409:
                    if exc.status == 404:
                        return False
                    raise
            fresh = await self.kube.get("Approval", namespace, name)
            if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
                return False
            if approval_rec.relayed(_status(fresh)):
                return False
            version = fresh["metadata"].get("resourceVersion")
        raise RetryLater(f"Approval {namespace}/{name} keeps changing")

    async def retry_waiting(self) -> None:
        """Runs for the operator's lifetime: waiting Approvals tried again."""
        while True:
            await asyncio.sleep(APPROVAL_RETRY_SECONDS)
            if not self._leading():
                continue
            for (namespace, name), body in list(self._waiting.items()):
                if (namespace, name) in self._busy:
                    continue
                try:
                    await self.on_approval(namespace, name, body)
                except Exception:  # this loop outlives any one Approval
                    log.exception("approval %s/%s: relaying failed", namespace, name)
