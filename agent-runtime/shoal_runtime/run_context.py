"""A run's shared context: a versioned key-value map that the steps of one workflow run
read and write, so one step reuses what another retrieved instead of asking the same
source again.

It lives in the run's own record (KV ``shoal-runs``), so the record keeps it and the
``when`` conditions and templates of later steps can read it as ``context``. Writes are
compare-and-set on the record's revision, which the dispatcher uses too: a write never
loses a concurrent state change, and with ``version=`` a handler makes its write
conditional on nobody having changed the context since it read it::

    async def handle(input, ctx):
        profile, version = await ctx.shared.get("profile")
        if profile is None:
            profile = await crm.lookup(input["customerId"])
            try:
                await ctx.shared.put("profile", profile, version=version)
            except ContextConflict:
                pass  # another step stored it first; either copy will do
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nats.js.kv import KeyValue

from shoal_api import kv as kvs
from shoal_api.runs.model import RunState
from shoal_api.runs.wire import run_key

# Compare-and-set retries against concurrent writers (dispatcher, other steps) before
# giving up; each retry re-reads the record.
ATTEMPTS = 50


class ContextConflict(Exception):  # noqa: N818  (an outcome callers handle)
    """The context changed since the version the write was conditional on."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"run context is at version {current}, not {expected}")
        self.expected, self.current = expected, current


class RunClosedError(Exception):
    """The run has finished (or its record expired): its context is read-only."""


class RunContext:
    def __init__(self, kv: KeyValue, namespace: str, run: str) -> None:
        self.kv = kv
        self.key = run_key(namespace, run)
        self.run = run

    async def _read(self) -> tuple[int, RunState]:
        raw, revision = await kvs.read(self.kv, self.key)
        if raw is None:
            raise RunClosedError(f"run {self.run} has no record")
        return revision, RunState.model_validate_json(raw)

    async def snapshot(self) -> tuple[dict[str, Any], int]:
        """The whole context and its version."""
        _, state = await self._read()
        return dict(state.context), state.context_version

    async def get(self, key: str, default: Any = None) -> tuple[Any, int]:
        """One value (``default`` when unset) and the context's version."""
        context, version = await self.snapshot()
        return context.get(key, default), version

    async def put(self, key: str, value: Any, *, version: int | None = None) -> int:
        return await self.update({key: value}, version=version)

    async def update(self, values: Mapping[str, Any], *, version: int | None = None) -> int:
        """Merges ``values`` into the context; returns the new version. With ``version``,
        only if the context is still at that version (else :class:`ContextConflict`)."""
        for _ in range(ATTEMPTS):
            revision, state = await self._read()
            if state.terminal:
                raise RunClosedError(f"run {self.run} is {state.phase}")
            if version is not None and state.context_version != version:
                raise ContextConflict(version, state.context_version)
            new = state.with_context(values)
            if new is state:
                return state.context_version
            if await kvs.compare_and_set(self.kv, self.key, new.to_json(), revision) is None:
                continue  # the dispatcher (or another step) wrote first: read again
            return new.context_version
        raise RuntimeError(f"run {self.run}: {ATTEMPTS} conflicting writes in a row")
