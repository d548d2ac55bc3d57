"""The task envelope parser: round trips and never anything but a Task or a clear error."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal_api import envelope as env

ids = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
hops = st.builds(
    env.Hop,
    agent=st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    reason=st.sampled_from(["fallback", "escalation", "downgrade"]),
    detail=st.text(max_size=30),
)
tasks = st.builds(
    env.Task,
    id=ids,
    input=json_values,
    priority=st.integers(0, 9),
    deadline=st.none() | st.floats(0, 4e9),
    attempt=st.integers(1, 100),
    run=st.none() | ids,
    step=st.none() | st.from_regex(r"[a-z]{1,10}", fullmatch=True),
    path=st.lists(hops, max_size=3).map(tuple),
    trace=st.dictionaries(st.sampled_from(["traceparent", "tracestate"]), st.text(max_size=20)),
    replays=st.integers(0, 5),
)


@given(tasks)
def test_a_task_survives_the_wire(task: env.Task) -> None:
    assert env.parse_task(task.to_json()) == task


@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_fail_with_a_reason(data: bytes) -> None:
    outcome: object
    try:
        outcome = env.parse_task(data)
    except env.EnvelopeError as exc:
        outcome = str(exc)
    assert isinstance(outcome, env.Task) or outcome.startswith("malformed task envelope: ")


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6), ids)
def test_arbitrary_objects_parse_or_fail_with_a_reason(doc: dict[str, Any], task_id: str) -> None:
    for candidate in (doc, {**doc, "id": task_id}):
        outcome: object
        try:
            outcome = env.parse_task(json.dumps(candidate).encode())
        except env.EnvelopeError as exc:
            outcome = str(exc)
        assert isinstance(outcome, env.Task) or "malformed task envelope" in outcome


def test_errors_name_the_field() -> None:
    for body, field in (
        (b'{"input": 1}', "id"),
        (b'{"id": "a", "priority": 12}', "priority"),
        (b'{"id": "a", "v": 2}', "v"),
        (b'{"id": "has.dot"}', "id"),
        (b'{"id": "a", "surprise": 1}', "surprise"),
    ):
        with pytest.raises(env.EnvelopeError, match=f": {field}"):
            env.parse_task(body)


def test_message_ids_deduplicate_per_hop_and_replay() -> None:
    task = env.Task(id="t1")
    hop = task.model_copy(update={"path": (env.Hop(agent="a", reason="fallback"),)})
    replay = task.model_copy(update={"replays": 1})
    assert len({task.msg_id(), hop.msg_id(), replay.msg_id()}) == 3
    assert task.result_msg_id() == hop.result_msg_id() != replay.result_msg_id()
