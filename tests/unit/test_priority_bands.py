"""How the runtime shares its pull capacity among the priority bands, how its puller
learns which bands have work (fetch answers, peeks), and how the operator adds the bands
up to one queue; without a server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from shoal_api import nats_layout as nl
from shoal_operator.clients.jetstream import combined, queue_counts
from shoal_runtime.stream import MAX_BYTES_EXCEEDED, Puller, Shares

WEIGHTS = [b.weight for b in nl.BANDS]
ALL = [True, True, True]

# -- shares ------------------------------------------------------------------------------


def totals(shares: Shares, capacities: list[int], with_work: list[bool]) -> list[int]:
    got = [0] * len(shares.weights)
    for capacity in capacities:
        for i, n in enumerate(shares.split(capacity, with_work)):
            got[i] += n
    return got


def test_the_weights_are_seven_two_one() -> None:
    assert WEIGHTS == [7, 2, 1]


def test_one_slot_at_a_time_still_follows_the_weights() -> None:
    assert totals(Shares(WEIGHTS), [1] * 10, ALL) == [7, 2, 1]
    assert totals(Shares(WEIGHTS), [1] * 1000, ALL) == [700, 200, 100]


def test_a_large_split_is_proportional() -> None:
    assert Shares(WEIGHTS).split(100, ALL) == [70, 20, 10]
    assert sum(Shares(WEIGHTS).split(256, ALL)) == 256


def test_the_highest_band_goes_first() -> None:
    assert Shares(WEIGHTS).split(1, ALL) == [1, 0, 0]


def test_the_bands_with_work_share_what_the_others_leave() -> None:
    assert totals(Shares(WEIGHTS), [1] * 80, [True, False, True]) == [70, 0, 10]
    assert totals(Shares(WEIGHTS), [3] * 10, [False, True, True]) == [0, 20, 10]


def test_a_lone_band_gets_everything() -> None:
    for with_work in ([True, False, False], [False, True, False], [False, False, True]):
        shares = Shares(WEIGHTS)
        assert shares.split(7, with_work) == [7 if w else 0 for w in with_work]


def test_no_capacity_or_no_work_gives_nothing() -> None:
    assert Shares(WEIGHTS).split(0, ALL) == [0, 0, 0]
    assert Shares(WEIGHTS).split(5, [False, False, False]) == [0, 0, 0]


def test_a_band_without_work_banks_no_credit() -> None:
    shares = Shares(WEIGHTS)
    totals(shares, [1] * 50, [True, False, False])
    # Idle all along, low is owed nothing: high still goes first once low has work.
    assert shares.split(1, [True, False, True]) == [1, 0, 0]


def test_weights_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Shares([1, 0])


@given(
    st.lists(
        st.tuples(st.integers(0, 300), st.lists(st.booleans(), min_size=3, max_size=3)),
        max_size=60,
    )
)
def test_splits_hand_out_exactly_the_capacity_to_bands_with_work(
    rounds: list[tuple[int, list[bool]]],
) -> None:
    shares = Shares(WEIGHTS)
    for capacity, with_work in rounds:
        got = shares.split(capacity, with_work)
        assert all(n >= 0 for n in got)
        assert all(n == 0 for n, w in zip(got, with_work, strict=True) if not w)
        assert sum(got) == (capacity if any(with_work) else 0)
        # What is owed either way stays under a task or two: no band runs away.
        assert all(abs(c) < 2 for c in shares.credit)


# -- the puller's view of the bands ------------------------------------------------------


class FakeClient:
    """Records what the puller publishes; the test answers through its inboxes."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any], str]] = []
        self.subs: dict[str, Callable[[Msg], Awaitable[None]]] = {}
        self._next = 0

    def new_inbox(self) -> str:
        self._next += 1
        return f"_INBOX.{self._next}"

    async def subscribe(
        self, subject: str, cb: Callable[[Msg], Awaitable[None]], **_: Any
    ) -> FakeSub:
        self.subs[subject] = cb
        return FakeSub()

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.published.append((subject, json.loads(payload), reply))

    def take(self) -> list[tuple[str, dict[str, Any], str]]:
        out, self.published = self.published, []
        return out


class FakeSub:
    async def unsubscribe(self) -> None:
        pass


def status(inbox: str, code: str, description: str = "") -> Msg:
    client: Any = None
    return Msg(_client=client, subject=inbox, headers={"Status": code, "Description": description})


def task(pending: int) -> Msg:
    client: Any = None
    reply = f"$JS.ACK.SHOAL_TASKS.t_a.1.10.9.1700000000000000000.{pending}"
    return Msg(_client=client, subject="shoal.task.t.a.5", reply=reply, data=b"{}")


CONSUMERS = ["t_a_high", "t_a", "t_a_low"]


async def started() -> tuple[Puller, FakeClient, list[Msg]]:
    nc = FakeClient()
    got: list[Msg] = []
    bands = list(zip(CONSUMERS, WEIGHTS, strict=True))
    puller = Puller(nc, "SHOAL_TASKS", bands, got.append, expires=0.2)  # type: ignore[arg-type]
    await puller.start()
    return puller, nc, got


def consumer(api: str) -> str:
    return api.rsplit(".", 1)[1]


async def answer(puller: Puller, nc: FakeClient, reply: str, msg: Msg) -> None:
    await nc.subs[reply](msg)


def test_the_first_pull_asks_every_band_by_weight_without_waiting() -> None:
    async def main() -> None:
        puller, nc, _ = await started()
        pull = asyncio.create_task(puller.pull(10))
        await asyncio.sleep(0)
        sent = nc.take()
        assert [(consumer(s), body) for s, body, _ in sent] == [
            ("t_a_high", {"batch": 7, "no_wait": True}),
            ("t_a", {"batch": 2, "no_wait": True}),
            ("t_a_low", {"batch": 1, "no_wait": True}),
        ]
        for _, _, reply in sent:
            await answer(puller, nc, reply, status(reply, "404", "No Messages"))
        await asyncio.wait_for(pull, 1)
        assert [b.has_work for b in puller.bands] == [False, False, False]

    asyncio.run(main())


def test_bands_without_work_are_peeked_and_a_peek_wakes_the_puller() -> None:
    async def main() -> None:
        puller, nc, _ = await started()
        for band in puller.bands:
            band.has_work = False
        pull = asyncio.create_task(puller.pull(10))
        await asyncio.sleep(0)
        peeks = nc.take()
        assert [b["max_bytes"] for _, b, _ in peeks] == [1, 1, 1]
        assert all(b["batch"] == 1 and "no_wait" not in b for _, b, _ in peeks)
        # The low band gets a task: the pull ends at once, not after its expiry.
        low = peeks[2][2]
        await answer(puller, nc, low, status(low, "409", MAX_BYTES_EXCEEDED))
        await asyncio.wait_for(pull, 0.1)
        assert [b.has_work for b in puller.bands] == [False, False, True]
        # The next pull fetches from the low band alone; the other peeks stay open.
        pull = asyncio.create_task(puller.pull(10))
        await asyncio.sleep(0)
        ((subject, body, reply),) = nc.take()
        assert (consumer(subject), body) == ("t_a_low", {"batch": 10, "no_wait": True})
        await answer(puller, nc, reply, task(pending=0))
        await answer(puller, nc, reply, status(reply, "404", "No Messages"))
        await asyncio.wait_for(pull, 1)
        assert puller.pending == 0

    asyncio.run(main())


def test_an_idle_puller_waits_for_a_task_where_the_last_came_from() -> None:
    async def main() -> None:
        puller, nc, got = await started()
        pull = asyncio.create_task(puller.pull(10))
        await asyncio.sleep(0)
        sent = {consumer(s): reply for s, _, reply in nc.take()}
        await answer(puller, nc, sent["t_a"], task(pending=0))
        for name in ("t_a_high", "t_a", "t_a_low"):
            await answer(puller, nc, sent[name], status(sent[name], "404", "No Messages"))
        await asyncio.wait_for(pull, 1)
        # Nothing anywhere: a long-poll for one task on the normal band, peeks elsewhere.
        pull = asyncio.create_task(puller.pull(10))
        await asyncio.sleep(0)
        watches = {consumer(s): (body, reply) for s, body, reply in nc.take()}
        assert watches["t_a"][0] == {"batch": 1, "expires": 200_000_000}
        assert watches["t_a_high"][0]["max_bytes"] == 1
        assert watches["t_a_low"][0]["max_bytes"] == 1
        # Its task comes straight in; nothing more behind it, so the band is idle again.
        reply = watches["t_a"][1]
        await answer(puller, nc, reply, task(pending=0))
        await asyncio.wait_for(pull, 0.1)
        assert len(got) == 2
        assert [b.has_work for b in puller.bands] == [False, False, False]

    asyncio.run(main())


def test_a_wait_keeps_one_slot_and_never_the_last() -> None:
    async def main() -> None:
        puller, nc, _ = await started()
        for band in puller.bands:
            band.has_work = False
        puller._recent = puller.bands[1]
        pull = asyncio.create_task(puller.pull(1))
        await asyncio.sleep(0)
        assert all("max_bytes" in body for _, body, _ in nc.take())  # one slot: peeks only
        pull.cancel()

        puller, nc, _ = await started()
        for band in puller.bands:
            band.has_work = False
        puller._recent = puller.bands[1]
        wake = asyncio.create_task(puller.pull(2))
        await asyncio.sleep(0)
        high = {consumer(s): reply for s, _, reply in nc.take()}["t_a_high"]
        await answer(puller, nc, high, status(high, "409", MAX_BYTES_EXCEEDED))
        await asyncio.wait_for(wake, 0.1)
        # High has work; of 2 slots the normal band's wait keeps 1.
        pull = asyncio.create_task(puller.pull(2))
        await asyncio.sleep(0)
        ((subject, body, _),) = nc.take()
        assert (consumer(subject), body) == ("t_a_high", {"batch": 1, "no_wait": True})
        pull.cancel()

    asyncio.run(main())


def test_a_pull_held_up_by_a_wait_goes_on_when_a_slot_frees() -> None:
    async def main() -> None:
        nc = FakeClient()
        slot = asyncio.Event()
        bands = list(zip(CONSUMERS, WEIGHTS, strict=True))
        puller = Puller(nc, "SHOAL_TASKS", bands, lambda _: None, expires=5, wake=slot)  # type: ignore[arg-type]
        await puller.start()
        for band in puller.bands:
            band.has_work = False
        puller._recent = puller.bands[2]
        first = asyncio.create_task(puller.pull(2))
        await asyncio.sleep(0)
        nc.take()
        slot.set()  # e.g. a task finished
        await asyncio.wait_for(first, 0.1)
        puller.bands[0].has_work = True
        # One slot, kept by the low band's wait: nothing to fetch until a slot frees.
        held = asyncio.create_task(puller.pull(1))
        await asyncio.sleep(0.01)
        assert not held.done()
        assert nc.take() == []
        slot.set()
        await asyncio.wait_for(held, 0.1)

    asyncio.run(main())


def test_a_filled_fetch_reads_what_is_left_from_its_last_message() -> None:
    async def main() -> None:
        puller, nc, got = await started()
        pull = asyncio.create_task(puller.pull(3))
        await asyncio.sleep(0)
        sent = {consumer(s): reply for s, _, reply in nc.take()}
        assert set(sent) == {"t_a_high", "t_a"}  # 3 slots: 2 + 1 by weight, low waits
        for left in (8, 7):
            await answer(puller, nc, sent["t_a_high"], task(pending=left))
        await answer(puller, nc, sent["t_a"], task(pending=0))
        await asyncio.wait_for(pull, 1)
        assert len(got) == 3
        assert [b.has_work for b in puller.bands] == [True, False, True]
        assert puller.pending == 7

    asyncio.run(main())


def test_a_refusing_consumer_is_reported_and_not_peeked_in_a_loop() -> None:
    async def main() -> None:
        puller, nc, _ = await started()
        for band in puller.bands:
            band.has_work = False
        pull = asyncio.create_task(puller.pull(10))
        await asyncio.sleep(0)
        high = nc.take()[0][2]
        await answer(puller, nc, high, status(high, "503"))
        await asyncio.wait_for(pull, 0.1)
        assert puller.last_status.startswith("503")
        await asyncio.wait_for(puller.pull(10), 1)  # expires: nothing to do
        assert nc.take() == []

    asyncio.run(main())


def test_an_expired_peek_is_renewed() -> None:
    async def main() -> None:
        puller, nc, _ = await started()
        for band in puller.bands:
            band.has_work = False
        pull = asyncio.create_task(puller.pull(10))
        await asyncio.sleep(0)
        normal = nc.take()[1][2]
        await answer(puller, nc, normal, status(normal, "408", "Request Timeout"))
        await asyncio.wait_for(pull, 0.1)
        assert puller.last_status == ""
        pull = asyncio.create_task(puller.pull(10))
        await asyncio.sleep(0)
        assert [consumer(s) for s, _, _ in nc.take()] == ["t_a"]
        pull.cancel()

    asyncio.run(main())


# -- the operator's view: one queue ------------------------------------------------------


def info(pending: int, in_flight: int, delivered: int) -> dict[str, Any]:
    return {
        "name": f"c{pending}",
        "config": {"max_ack_pending": 8},
        "num_pending": pending,
        "num_ack_pending": in_flight,
        "num_redelivered": 1,
        "num_waiting": 2,
        "delivered": {"consumer_seq": delivered, "stream_seq": 99},
    }


def test_the_queue_is_the_sum_of_the_bands() -> None:
    total = combined([info(3, 1, 10), info(0, 2, 5), info(4, 0, 0)])
    assert queue_counts(total) == (7, 3)
    assert total["delivered"]["consumer_seq"] == 15  # the arrival rate counts deliveries
    assert (total["num_redelivered"], total["num_waiting"]) == (3, 6)
    assert total["config"] == {"max_ack_pending": 8}


def test_a_single_band_combines_to_itself() -> None:
    one = info(3, 1, 10)
    assert combined([one]) == one


def test_nothing_to_combine_is_an_error() -> None:
    with pytest.raises(ValueError, match="no consumer"):
        combined([])
