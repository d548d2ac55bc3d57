"""The deduplicating work queue (asyncio, driven with asyncio.run)."""

from __future__ import annotations

import asyncio

from shoal_operator.workqueue import WorkQueue


async def drain(q: WorkQueue[str]) -> list[str]:
    """Keys that can be taken from the queue right now, without marking them done."""
    out: list[str] = []
    while True:
        try:
            out.append(await asyncio.wait_for(q.get(), 0.01))
        except TimeoutError:
            return out


def test_add_deduplicates_queued_keys() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        q.add("a")
        q.add("b")
        q.add("a")
        assert len(q) == 2
        assert await drain(q) == ["a", "b"]

    asyncio.run(main())


def test_get_is_fifo() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        for key in ("c", "a", "b"):
            q.add(key)
        assert [await q.get() for _ in range(3)] == ["c", "a", "b"]

    asyncio.run(main())


def test_done_without_changes_does_not_requeue() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        key = await q.get()
        assert len(q) == 1  # active keys count
        q.done(key)
        assert len(q) == 0
        assert await drain(q) == []

    asyncio.run(main())


def test_key_added_while_active_is_requeued_once_when_done() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        key = await q.get()
        q.add("a")
        q.add("a")
        # Not handed to a second worker while the first still holds it.
        assert await drain(q) == []
        q.done(key)
        assert await drain(q) == ["a"]

    asyncio.run(main())


def test_key_added_after_get_can_be_queued_again() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        q.done(await q.get())
        q.add("a")
        assert await drain(q) == ["a"]

    asyncio.run(main())


def test_other_keys_flow_while_one_is_active() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        await q.get()
        q.add("b")
        assert await drain(q) == ["b"]

    asyncio.run(main())


def test_add_after_fires_once() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add_after("a", 0.02)
        q.add_after("a", 0.02)
        assert len(q) == 0
        assert await asyncio.wait_for(q.get(), 1) == "a"
        q.done("a")
        await asyncio.sleep(0.05)
        assert await drain(q) == []

    asyncio.run(main())


def test_add_after_deduplicates_with_a_queued_key() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        q.add_after("a", 0.01)
        await asyncio.sleep(0.03)
        assert len(q) == 1
        assert await drain(q) == ["a"]

    asyncio.run(main())


def test_add_after_can_be_scheduled_again_after_firing() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add_after("a", 0.01)
        q.done(await asyncio.wait_for(q.get(), 1))
        q.add_after("a", 0.01)
        assert await asyncio.wait_for(q.get(), 1) == "a"

    asyncio.run(main())


def test_add_after_while_active_marks_dirty() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        key = await q.get()
        q.add_after("a", 0.01)
        await asyncio.sleep(0.03)
        assert await drain(q) == []
        q.done(key)
        assert await drain(q) == ["a"]

    asyncio.run(main())


def test_close_cancels_pending_timers() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add_after("a", 0.01)
        q.close()
        await asyncio.sleep(0.03)
        assert len(q) == 0
        assert await drain(q) == []

    asyncio.run(main())


def test_tuple_keys() -> None:
    async def main() -> None:
        q: WorkQueue[tuple[str, str, str]] = WorkQueue()
        q.add(("Agent", "ns", "a"))
        q.add(("Agent", "ns", "a"))
        q.add(("Workflow", "ns", "a"))
        assert len(q) == 2

    asyncio.run(main())


def test_the_sooner_of_two_timers_wins() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add_after("a", 5.0)  # a long failure backoff...
        q.add_after("a", 0.01)  # ...does not delay a short re-queue
        assert await asyncio.wait_for(q.get(), 1) == "a"
        q.done("a")
        q.close()

    asyncio.run(main())


def test_event_keys_go_before_resync_keys() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        for key in ("r1", "r2", "r3"):
            q.add(key, low=True)
        q.add("edit")
        q.add("r3")  # an event for a key already queued by the resync promotes it
        assert await drain(q) == ["edit", "r3", "r1", "r2"]

    asyncio.run(main())


def test_dirty_key_keeps_the_higher_priority() -> None:
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        assert await q.get() == "a"
        q.add("a")  # an event while active
        q.add("a", low=True)  # then the resync
        q.add("b", low=True)
        q.done("a")
        assert await drain(q) == ["a", "b"]

    asyncio.run(main())
