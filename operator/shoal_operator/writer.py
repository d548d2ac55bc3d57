"""Every write the reconciles make to the API server, and when they skip one.

Server-side apply is skipped when neither the desired object nor the observed one has
changed since our last apply; a status is written only when it differs from what the
object shows (and counters that move all the time at most every few seconds);
finalizers are written with a resourceVersion precondition; Events are best effort.
One place, so that "write only when changed" holds for every kind alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError

from shoal_api.base import ApiModel, ObjectStatus, status_patch
from shoal_api.timestamps import now_rfc3339
from shoal_operator.cache import Key
from shoal_operator.clients.kube import ApiError as ApiException
from shoal_operator.clients.kube import Kube
from shoal_operator.settings import FINALIZER
from shoal_operator.status_conditions import (
    Cond,
    EventSpec,
    merge_conditions,
    transition_events,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=ApiModel)
S = TypeVar("S", bound=ApiModel)

# Counts change all the time under load; without a condition flip they reach status at
# most this often (a status is a throttled mirror, not a live feed).
STATUS_THROTTLE_SECONDS = 5.0
THROTTLED_STATUS_KEYS = frozenset(
    {
        "queue",
        "usage",
        "replicas",
        "readyReplicas",
        "currentReplicas",
        "desiredReplicas",
        "lastScaleTime",
        "runs",
        "p95DurationSeconds",
        "lastRunTime",
    }
)


class RetryLater(Exception):  # noqa: N818  (a signal, not an error)
    """The reconcile did what it could; run it again with backoff (no traceback)."""


def api_reason(exc: BaseException) -> str:
    """What went wrong, in the API server's words where it said something."""
    if isinstance(exc, ApiException):
        with contextlib.suppress(Exception):
            return str(json.loads(exc.body or b"{}").get("message", exc.reason))
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def validation_message(exc: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _version(obj: Mapping[str, Any] | None) -> str:
    """What changes when somebody else edits an object: generation where it has one."""
    if obj is None:
        return ""
    meta = obj.get("metadata", {})
    gen = meta.get("generation")
    return f"g{gen}" if gen is not None else f"r{meta.get('resourceVersion', '')}"


def _key(kind: str, body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return (kind, meta["namespace"], meta["name"])


@dataclass
class Writer:
    kube: Kube
    requeue: Callable[[Key, float], None]
    """Asks for another reconcile after a delay (a throttled status write)."""
    clock: Callable[[], str] = now_rfc3339
    # key -> (digest of what we applied, generation or resourceVersion after)
    _applied: dict[Key, tuple[str, str]] = field(default_factory=dict)
    _status_written: dict[Key, float] = field(default_factory=dict)
    # key -> (resourceVersion our last status write patched, the status it wrote)
    _status_pending: dict[Key, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    # -- children -------------------------------------------------------------------

    async def apply(
        self,
        obj: dict[str, Any],
        observed: Mapping[str, Any] | None,
        force: bool,
        watched: bool = True,
    ) -> dict[str, Any] | None:
        """Server-side apply, skipped when neither the input nor the object has changed
        since our last apply. ``watched`` children are compared with the watch cache;
        the others are re-applied by the drift check, which always applies."""
        meta = obj["metadata"]
        key = (obj["kind"], meta["namespace"], meta["name"])
        digest = _digest(obj)
        last = self._applied.get(key)
        if not force and last is not None:
            if not watched and last[0] == digest:
                return None
            if observed is not None and last == (digest, _version(observed)):
                return dict(observed)
        result = await self.kube.apply(obj)
        self._applied[key] = (digest, _version(result))
        return result

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        await self.kube.delete(kind, namespace, name)
        self._applied.pop((kind, namespace, name), None)

    # -- status ---------------------------------------------------------------------

    def throttle_left(self, key: Key) -> float:
        """Seconds until a throttled status of ``key`` may be written again (<= 0: now)."""
        return self._status_written.get(key, 0.0) + STATUS_THROTTLE_SECONDS - time.monotonic()

    def current_status(self, kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The object's status, including our last write while the watch cache has not
        caught up with it: a reconcile in between (a KV update, a child event) then sees
        the transition as done, and posts its Event once, not twice."""
        meta = body["metadata"]
        key = _key(kind, body)
        status: dict[str, Any] = body.get("status") or {}
        pending = self._status_pending.get(key)
        if pending is None:
            return status
        if pending[0] == str(meta.get("resourceVersion", "")):
            return {**status, **pending[1]}
        del self._status_pending[key]
        return status

    def observed_status(self, kind: str, body: Mapping[str, Any], model: type[S]) -> S:
        """:meth:`current_status` as the kind's status model. A status the model cannot
        read (written by hand, or by another version) counts as empty: the reconcile
        then writes a complete one."""
        raw = self.current_status(kind, body)
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            meta = body["metadata"]
            log.warning(
                "%s %s/%s: status not understood, rewritten (%s)",
                kind,
                meta["namespace"],
                meta["name"],
                exc,
            )
            return model()

    async def write_status(
        self, kind: str, body: Mapping[str, Any], status: ApiModel, events: Iterable[EventSpec]
    ) -> None:
        """Patches the status if it changed (throttled for counters), then posts
        ``events``."""
        meta = body["metadata"]
        key = _key(kind, body)
        wire: dict[str, Any] = status_patch(status)["status"]
        current = self.current_status(kind, body)
        changed = {k for k, v in wire.items() if current.get(k) != v}
        if changed and changed <= THROTTLED_STATUS_KEYS:
            wait = self.throttle_left(key)
            if wait > 0:
                self.requeue(key, wait)
                changed = set()
        if changed:
            await self.kube.merge_patch(
                kind, meta["namespace"], meta["name"], {"status": wire}, sub="status"
            )
            self._status_written[key] = time.monotonic()
            self._status_pending[key] = (str(meta.get("resourceVersion", "")), wire)
        await self.post_events(body, events)

    async def post_events(self, body: Mapping[str, Any], events: Iterable[EventSpec]) -> None:
        for ev in events:
            try:
                await self.kube.event(dict(body), ev.type, ev.reason, ev.message)
            except Exception as exc:  # an Event is best effort, never worth a retry
                log.warning("posting event %s failed: %s", ev.reason, api_reason(exc))

    # -- specs ----------------------------------------------------------------------

    async def parse(self, kind: str, body: Mapping[str, Any], model: type[M]) -> M | None:
        """The spec parsed by the models, or None after reporting it InvalidSpec."""
        try:
            return model.model_validate(body["spec"])
        except ValidationError as exc:
            await self._invalid(kind, body, exc)
            return None

    async def _invalid(self, kind: str, body: Mapping[str, Any], exc: ValidationError) -> None:
        message = validation_message(exc)
        gen = int(body["metadata"].get("generation", 0))
        # Only the part every kind shares is read (and written): the rest stays as shown.
        raw = self.current_status(kind, body).get("conditions") or []
        try:
            shown = ObjectStatus.model_validate({"conditions": raw}).conditions
        except ValidationError:
            shown = ()
        conds = merge_conditions(
            shown,
            [
                Cond("Ready", "False", "InvalidSpec", message),
                Cond("Degraded", "True", "InvalidSpec", message),
            ],
            gen,
            self.clock(),
        )
        await self.write_status(
            kind,
            body,
            ObjectStatus(observed_generation=gen, conditions=conds),
            transition_events(shown, conds),
        )

    # -- finalizers -----------------------------------------------------------------

    async def _set_finalizers(self, kind: str, meta: Mapping[str, Any], new: list[str]) -> None:
        """Writes metadata.finalizers, failing (409) if the object changed meanwhile."""
        patch = {"metadata": {"finalizers": new, "resourceVersion": meta["resourceVersion"]}}
        await self.kube.merge_patch(kind, meta["namespace"], meta["name"], patch)

    async def release_if_deleted(
        self,
        kind: str,
        body: Mapping[str, Any],
        cleanup: Callable[[], Awaitable[None]] | None,
    ) -> bool:
        """For an object being deleted: cleanup, then drop our finalizer. True if deleted."""
        meta = body["metadata"]
        if not meta.get("deletionTimestamp"):
            return False
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER in finalizers:
            if cleanup is not None:
                await cleanup()
            await self._set_finalizers(kind, meta, [f for f in finalizers if f != FINALIZER])
        return True

    async def ensure_finalizer(self, kind: str, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            await self._set_finalizers(kind, meta, [*finalizers, FINALIZER])
