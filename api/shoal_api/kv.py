"""Reading and compare-and-set of a NATS KV record: the one implementation behind every
shared record Shoal rewrites (circuits, rate-limit slices, run records, run context).

A writer reads ``(value, revision)``, computes the new value and writes it only if the
key is still at that revision; on a conflict it reads again. Revision 0 means "absent"
(never written, deleted or purged), so creating a record is the same call."""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue


async def read(kv: KeyValue, key: str) -> tuple[bytes | None, int]:
    """The value (None when absent or deleted) and the revision to write against."""
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, NotFoundError):
        return None, 0
    if entry.value is None or entry.operation in ("DEL", "PURGE"):
        return None, entry.revision or 0
    return entry.value, entry.revision or 0


async def compare_and_set(kv: KeyValue, key: str, value: bytes, revision: int) -> int | None:
    """Writes ``value`` if ``key`` is still at ``revision``; returns the new revision, or
    None when another writer got there first (read again and retry)."""
    try:
        return await kv.update(key, value, last=revision)
    except KeyWrongLastSequenceError:
        return None
