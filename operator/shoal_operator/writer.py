"""Every write the reconciles make to the API server, and when they skip one.

Server-side apply is skipped when neither the desired object nor the observed one has
changed since our last apply; a status is written only when it differs from what the
object shows (and counters that move all the time at most every few seconds), and a
change without an Event less than a second after the previous write waits out that
second, so changes arriving together go out as one write; finalizers are written with
a resourceVersion precondition; Events are best effort. The writer remembers the
resourceVersion each of its writes produced, so the watch event of its own write (an
echo) queues no reconcile.
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
from shoal_operator.clients.kube import ApiError, Kube
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
# A status change without an Event waits this long after the previous write of the same
# object: the steps of a burst (a policy's Active and first decision) go out together.
STATUS_COALESCE_SECONDS = 1.0
# Our latest writes of an object whose watch events are recognised as echoes (a
# finalizer and a status written by one reconcile arrive as two events).
ECHOES_KEPT = 4
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
    if isinstance(exc, ApiError):
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


def _rv(meta: Mapping[str, Any]) -> str:
    return str(meta.get("resourceVersion", ""))


def _older(rv: str, than: str) -> bool | None:
    """Whether resourceVersion ``rv`` precedes ``than``; None when they cannot be compared
    (resourceVersions are etcd revisions in every API server, but only promised opaque)."""
    if rv.isdigit() and than.isdigit():
        return int(rv) < int(than)
    return None


def _identity(meta: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a reconcile reads of an object besides its spec and our own writes: an event
    whose object differs from ours only in status and finalizers is our own echo."""
    labels = sorted((meta.get("labels") or {}).items())
    return (meta.get("uid"), meta.get("generation"), meta.get("deletionTimestamp"), labels)


@dataclass
class Writer:
    kube: Kube
    requeue: Callable[[Key, float], None]
    """Asks for another reconcile after a delay (a throttled status write)."""
    clock: Callable[[], str] = now_rfc3339
    # key -> (digest of what we applied, generation or resourceVersion after)
    _applied: dict[Key, tuple[str, str]] = field(default_factory=dict)
    _status_written: dict[Key, float] = field(default_factory=dict)
    # key -> (resourceVersion our last status write patched, the one it produced, the
    # status it wrote)
    _status_pending: dict[Key, tuple[str, str, dict[str, Any]]] = field(default_factory=dict)
    # key -> {resourceVersion one of our latest writes produced: the object's identity}
    _echo: dict[Key, dict[str, tuple[Any, ...]]] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)
    """Writes made, by kind ("apply Deployment", "status Agent", "finalizer Agent", ...)."""

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
        self._count(f"apply {obj['kind']}")
        self._applied[key] = (digest, _version(result))
        return result

    def _count(self, what: str) -> None:
        self.writes[what] = self.writes.get(what, 0) + 1

    # -- echoes ---------------------------------------------------------------------

    def _wrote(self, key: Key, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
        rv = _rv(after.get("metadata") or {})
        if rv:
            mine = self._echo.setdefault(key, {})
            mine[rv] = _identity(before["metadata"])
            while len(mine) > ECHOES_KEPT:
                del mine[next(iter(mine))]

    def is_echo(self, kind: str, body: Mapping[str, Any]) -> bool:
        """Whether ``body`` (a watch event's object) is what our latest write of it made,
        nothing else changed: the reconcile that wrote it already saw everything else."""
        meta = body.get("metadata") or {}
        key = (kind, meta.get("namespace", ""), meta.get("name", ""))
        identity = self._echo.get(key, {}).get(_rv(meta))
        return identity is not None and identity == _identity(meta)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object is gone: drop what the writer remembers of it."""
        key = (kind, namespace, name)
        for memo in (self._status_written, self._status_pending, self._echo):
            memo.pop(key, None)

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
        before, after, wire = pending
        rv = _rv(meta)
        older = _older(rv, after)
        if older or (older is None and rv == before):
            # The cache shows the object before our write (maybe after other writes of
            # ours, a finalizer say): our status is the newer one.
            return {**status, **wire}
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
        events = list(events)
        changed = {k for k, v in wire.items() if current.get(k) != v}
        if changed:
            last = self._status_written.get(key)
            if changed <= THROTTLED_STATUS_KEYS:
                hold = STATUS_THROTTLE_SECONDS
            else:
                # A transition with an Event is news and goes out now (a circuit that
                # opens and closes within the window is two Events, not none).
                hold = 0.0 if events else STATUS_COALESCE_SECONDS
            wait = 0.0 if last is None else last + hold - time.monotonic()
            if wait > 0:
                # Comes back when the wait is over, with whatever else changed meanwhile.
                self.requeue(key, wait)
                return
            result = await self.kube.merge_patch(
                kind, meta["namespace"], meta["name"], {"status": wire}, sub="status"
            )
            self._count(f"status {kind}")
            self._status_written[key] = time.monotonic()
            self._status_pending[key] = (_rv(meta), _rv(result.get("metadata") or {}), wire)
            self._wrote(key, body, result)
        await self.post_events(body, events)

    async def post_events(self, body: Mapping[str, Any], events: Iterable[EventSpec]) -> None:
        for ev in events:
            try:
                await self.kube.event(dict(body), ev.type, ev.reason, ev.message)
                self._count("event")
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
        result = await self.kube.merge_patch(kind, meta["namespace"], meta["name"], patch)
        self._count(f"finalizer {kind}")
        key = (kind, meta["namespace"], meta["name"])
        self._wrote(key, {"metadata": meta}, result)

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
