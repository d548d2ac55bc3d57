"""The run records in NATS KV: the only module that reads or writes them.

A run is one record (``<namespace>.<run id>`` in bucket ``shoal-runs``) and every change
of it is a compare-and-set on the revision it was computed from, so two writers (two
dispatchers during a leader hand-over, or the dispatcher and a handler writing the
run's context) never both move a run on from the same revision. Reads and
compare-and-set go through :mod:`shoal_api.kv`, like every other shared record.

New runs are created with ``KeyValue.create`` (create-if-absent, also over a delete
marker) rather than a compare-and-set at revision 0: an idempotency key must name one
run however often it is submitted, and the refusal is how a repeat is recognised.

The store also remembers the revision and state it last wrote for each live run. That
saves the read before each advance, which is most of a step's latency; a stale entry
(another writer came first, or a nats-server lost its latest writes) costs one failed
compare-and-set, after which the record is read again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import ValidationError

from shoal_api import kv as kv_records
from shoal_api.runs.model import RunState

log = logging.getLogger(__name__)

Record = tuple[int, RunState]
"""(revision, state) of a run record."""


class RunGone(Exception):  # noqa: N818  (a signal, not an error)
    """The run's record does not exist (never did, or expired)."""


class RunStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        # key -> (revision, state) as last stored here; live runs only.
        self._cache: dict[str, Record] = {}

    # -- the record ------------------------------------------------------------------

    async def read(self, key: str) -> Record | None:
        """The record as stored, or None when there is none."""
        value, revision = await kv_records.read(self.kv, key)
        if not value:
            return None
        return revision, RunState.model_validate_json(value)

    async def current(self, key: str) -> tuple[Record | None, bool]:
        """The record as last stored here if remembered, else as read; and whether it
        came from memory (then it may be behind the store)."""
        cached = self._cache.get(key)
        if cached is not None:
            return cached, True
        return await self.read(key), False

    async def create(self, key: str, state: RunState) -> int | None:
        """Stores a new run; its revision, or None when the key is taken."""
        try:
            revision = await self.kv.create(key, state.to_json())
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        self.remember(key, revision, state)
        return revision

    async def compare_and_set(self, key: str, state: RunState, revision: int) -> int | None:
        """Writes ``state`` if the record is still at ``revision``: the new revision, or
        None when another writer came first (the remembered state is forgotten then)."""
        stored = await kv_records.compare_and_set(self.kv, key, state.to_json(), revision)
        if stored is None:
            self.forget(key)
            return None
        self.remember(key, stored, state)
        return stored

    # -- what is remembered ----------------------------------------------------------

    def remember(self, key: str, revision: int, state: RunState) -> None:
        """Finished runs are not kept: they are read again if ever needed."""
        if state.terminal:
            self._cache.pop(key, None)
        else:
            self._cache[key] = (revision, state)

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    # -- start-up --------------------------------------------------------------------

    async def scan(self) -> AsyncIterator[tuple[str, Record]]:
        """Every readable record in the bucket (unreadable ones are logged and passed
        over), remembering the live ones."""
        watcher = await self.kv.watch("*.*", ignore_deletes=True)
        try:
            while (entry := await watcher.updates(timeout=30)) is not None:  # type: ignore[no-untyped-call]
                if not entry.value:
                    continue
                try:
                    state = RunState.model_validate_json(entry.value)
                except ValidationError as exc:
                    log.warning("ignoring unreadable run record %s: %s", entry.key, exc)
                    continue
                record = (entry.revision or 0, state)
                self.remember(entry.key, *record)
                yield entry.key, record
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py
