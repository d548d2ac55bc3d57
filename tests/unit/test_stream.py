"""Reading delivery counts from JetStream reply subjects without nats-py's metadata."""

from __future__ import annotations

from typing import Any

from nats.aio.msg import Msg

from shoal_runtime.stream import delivery


def _msg(reply: str) -> Msg:
    client: Any = None
    return Msg(_client=client, subject="shoal.task.ns.a.5", reply=reply, data=b"{}")


def test_v1_reply_subjects_are_split_directly() -> None:
    reply = "$JS.ACK.SHOAL_TASKS.ns_a.3.10.9.1700000000000000000.42"
    assert delivery(_msg(reply)) == (3, 42)
    assert delivery(_msg(reply)) == (_msg(reply).metadata.num_delivered, 42)


def test_v2_reply_subjects_fall_back_to_nats_py() -> None:
    reply = "$JS.ACK.hub.ACCHASH.SHOAL_TASKS.ns_a.2.10.9.1700000000000000000.7.rand"
    assert delivery(_msg(reply)) == (2, 7)
