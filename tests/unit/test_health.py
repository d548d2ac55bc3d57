"""The watch-heartbeat liveness rule."""

from __future__ import annotations

from shoal_operator.clients.health import HEARTBEAT_LABEL, Heartbeat


def test_healthy_while_heartbeats_arrive() -> None:
    hb = Heartbeat("ns", "op", interval=10, tolerance=6)
    hb.last_seen = 1000.0
    assert hb.stalled_for(1000.0 + 59) is None
    assert hb.stalled_for(1000.0 + 60) is None


def test_stalled_after_tolerance_intervals() -> None:
    hb = Heartbeat("ns", "op", interval=10, tolerance=6)
    hb.last_seen = 1000.0
    assert hb.stalled_for(1000.0 + 61) == 61.0
    hb.last_seen = 1061.0  # a renewal came back through the watch
    assert hb.stalled_for(1062.0) is None


def test_lease_is_labelled_for_the_watch_and_expires_with_tolerance() -> None:
    lease = Heartbeat("ops", "shoal-operator-x", interval=2, tolerance=6).lease()
    assert lease["metadata"] == {
        "name": "shoal-operator-x",
        "namespace": "ops",
        "labels": {HEARTBEAT_LABEL: "true"},
    }
    spec = lease["spec"]
    assert isinstance(spec, dict)
    assert spec["holderIdentity"] == "shoal-operator-x"
    assert spec["leaseDurationSeconds"] == 12
