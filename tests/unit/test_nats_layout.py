"""Subject, stream and key names: the contract between operator, runtime and clients."""

from __future__ import annotations

import pytest

from shoal_api import nats_layout as nl


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def test_task_subject() -> None:
    assert nl.task_subject("team-a", "triage", 7) == "shoal.task.team-a.triage.7"


@pytest.mark.parametrize("priority", [-1, 10, 99])
def test_task_subject_rejects_priority_out_of_range(priority: int) -> None:
    with pytest.raises(ValueError, match="priority"):
        nl.task_subject("ns", "a", priority)


@pytest.mark.parametrize("priority", list(nl.PRIORITIES))
def test_agent_filter_matches_every_priority(priority: int) -> None:
    subject = nl.task_subject("ns", "a", priority)
    assert matches(nl.agent_task_filter("ns", "a"), subject)
    assert matches(nl.TASK_SUBJECTS, subject)


def test_agent_filter_does_not_match_other_agents() -> None:
    f = nl.agent_task_filter("ns", "a")
    assert not matches(f, nl.task_subject("ns", "ab", 0))
    assert not matches(f, nl.task_subject("other", "a", 0))


def test_other_subjects() -> None:
    assert nl.result_subject("ns", "t1") == "shoal.result.ns.t1"
    assert nl.dlq_subject("ns", "a") == "shoal.dlq.ns.a"
    assert nl.run_subject("ns", "wf") == "shoal.run.ns.wf"
    assert matches(nl.RESULT_SUBJECTS, nl.result_subject("ns", "t1"))
    assert matches(nl.DLQ_SUBJECTS, nl.dlq_subject("ns", "a"))


def test_stream_subjects_do_not_overlap() -> None:
    samples = [
        nl.task_subject("ns", "a", 0),
        nl.result_subject("ns", "a"),
        nl.dlq_subject("ns", "a"),
        nl.run_subject("ns", "a"),
    ]
    patterns = [nl.TASK_SUBJECTS, nl.RESULT_SUBJECTS, nl.DLQ_SUBJECTS]
    for subject in samples:
        assert sum(matches(p, subject) for p in patterns) <= 1


def test_consumer_name_has_no_dots() -> None:
    name = nl.consumer_name("team-a", "triage")
    assert name == "team-a_triage"
    assert "." not in name


def test_band_consumer_names() -> None:
    assert nl.consumer_names("team-a", "triage") == [
        "team-a_triage_high",
        "team-a_triage",
        "team-a_triage_low",
    ]
    assert nl.consumer_name("team-a", "triage", "normal") == nl.consumer_name("team-a", "triage")


def test_bands_partition_the_priorities_highest_first() -> None:
    assert sorted(p for b in nl.BANDS for p in b.priorities) == list(nl.PRIORITIES)
    lowest = [min(b.priorities) for b in nl.BANDS]
    assert lowest == sorted(lowest, reverse=True)
    assert [b.weight for b in nl.BANDS] == sorted((b.weight for b in nl.BANDS), reverse=True)
    assert nl.NAMED_BAND in {b.name for b in nl.BANDS}
    assert nl.band_of(5).name == nl.NAMED_BAND  # the default priority keeps its consumer


@pytest.mark.parametrize("priority", list(nl.PRIORITIES))
def test_each_priority_is_in_exactly_its_bands_subjects(priority: int) -> None:
    subject = nl.task_subject("ns", "a", priority)
    holders = [b for b in nl.BANDS if subject in nl.band_task_subjects("ns", "a", b)]
    assert holders == [nl.band_of(priority)]


def test_band_of_rejects_priority_out_of_range() -> None:
    with pytest.raises(ValueError, match="priority"):
        nl.band_of(10)


def test_names_are_unambiguous_for_dns_labels() -> None:
    # Dashes in names must not let two (namespace, agent) pairs collide.
    assert nl.consumer_name("a-b", "c") != nl.consumer_name("a", "b-c")
    assert nl.consumer_name("a", "b", "low") != nl.consumer_name("a", "b-low")
    assert nl.agent_key("a-b", "c") != nl.agent_key("a", "b-c")


def test_agent_key() -> None:
    assert nl.agent_key("ns", "a") == "ns.a"


def test_buckets() -> None:
    assert set(nl.BUCKETS) == {
        "shoal-circuit",
        "shoal-cache",
        "shoal-runs",
        "shoal-usage",
        "shoal-stats",
    }
    assert len(nl.BUCKETS) == len(set(nl.BUCKETS))
