"""Workflow runs end to end on a real nats-server: dispatcher + runtimes, no Kubernetes."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shoal_cli.client import DispatcherUnavailableError, RunRejectedError, ShoalClient
from shoal_testbed.fixtures import NatsServer
from tests.runtime.support import NS
from tests.workflows.support import (
    StaticCatalog,
    agent_spec,
    agents,
    dispatcher,
    finished,
    timeline,
)

pytestmark = pytest.mark.nats

DIAMOND: dict[str, Any] = {
    "input": {"type": "object", "required": ["customerId", "message"]},
    "deadlineSeconds": 60,
    "steps": [
        {"name": "authenticate", "agent": "auth", "input": {"customerId": "${input.customerId}"}},
        {
            "name": "classify",
            "agent": "triage",
            "dependsOn": ["authenticate"],
            "input": {"text": "${input.message}", "sleep": 0.5, "category": "${input.category}"},
        },
        {
            "name": "compliance",
            "agentSelector": {"capability": "compliance-check", "strategy": "LeastLag"},
            "dependsOn": ["authenticate"],
            "input": {"customerId": "${input.customerId}", "sleep": 0.5},
        },
        {
            "name": "answer",
            "agent": "support",
            "dependsOn": ["classify", "compliance"],
            "when": "steps.classify.output.category != 'spam'",
            "input": {"text": "${input.message}", "category": "${steps.classify.output.category}"},
        },
    ],
    "output": {"answer": "${steps.answer.output}"},
}
DIAMOND_AGENTS = {
    "auth": agent_spec(),
    "triage": agent_spec(),
    "compliance": agent_spec(capabilities=["compliance-check"]),
    "support": agent_spec(),
}


def catalog(**workflows: dict[str, Any]) -> StaticCatalog:
    return StaticCatalog(
        {"customer-inquiry": DIAMOND, **workflows}, {"compliance": ["compliance-check"]}
    )


def test_the_diamond_runs_its_middle_steps_in_parallel(
    nats_server: NatsServer, timeline_file: Path
) -> None:
    async def main() -> None:
        url = nats_server.url
        async with (
            agents(url, DIAMOND_AGENTS),
            dispatcher(url, catalog()),
            await ShoalClient.connect(url) as client,
        ):
            reply = await client.submit_run(
                NS,
                "customer-inquiry",
                {"customerId": "c1", "message": "refund", "category": "billing"},
            )
            assert reply.created
            assert reply.run
            seen = [s async for s in client.watch_run(NS, reply.run)]
            state = await finished(client, reply.run)
        assert seen[-1] == state
        assert state.phase == "Succeeded", state
        assert state.steps["compliance"].agent == "compliance"
        assert state.output == {"answer": state.steps["answer"].output}
        assert state.output["answer"]["got"]["category"] == "billing"
        by_step = {line["step"]: line for line in timeline(timeline_file)}
        assert sorted(by_step) == ["answer", "authenticate", "classify", "compliance"]
        classify, compliance = by_step["classify"], by_step["compliance"]
        # Both middle steps were executing at the same moment...
        assert max(classify["start"], compliance["start"]) < min(classify["end"], compliance["end"])
        # ...after authenticate, and answer only after both.
        assert min(classify["start"], compliance["start"]) >= by_step["authenticate"]["end"]
        assert by_step["answer"]["start"] >= max(classify["end"], compliance["end"])

    asyncio.run(main())


def test_when_false_skips_and_a_failing_step_uses_its_fallback(
    nats_server: NatsServer, timeline_file: Path
) -> None:
    flaky: dict[str, Any] = {
        "steps": [
            {
                "name": "fetch",
                "agent": "broken",
                "retry": {"maxAttempts": 2},
                "fallback": {"agent": "backup"},
                "input": {},
            },
            {
                "name": "never",
                "agent": "backup",
                "dependsOn": ["fetch"],
                "when": "input.go",
                "input": {},
            },
        ]
    }

    async def main() -> None:
        url = nats_server.url
        specs = {**DIAMOND_AGENTS, "broken": agent_spec("fail"), "backup": agent_spec()}
        async with (
            agents(url, specs),
            dispatcher(url, catalog(flaky=flaky)),
            await ShoalClient.connect(url) as client,
        ):
            spam = await client.submit_run(
                NS, "customer-inquiry", {"customerId": "c2", "message": "buy!", "category": "spam"}
            )
            fallback = await client.submit_run(NS, "flaky", {"go": False})
            spam_state = await finished(client, spam.run or "")
            fb_state = await finished(client, fallback.run or "")
        assert spam_state.phase == "Succeeded"
        assert spam_state.steps["answer"].phase == "Skipped"
        assert spam_state.steps["answer"].reason == "WhenFalse"
        fetch = fb_state.steps["fetch"]
        assert (fetch.phase, fetch.agent, fetch.attempt, fetch.on_fallback) == (
            "Succeeded",
            "backup",
            3,
            True,
        )
        assert fb_state.steps["never"].phase == "Skipped"
        # The step's retry is the dispatcher's: the broken Agent ran exactly twice.
        broken_runs = [x for x in timeline(timeline_file) if x["agent"] == "broken"]
        assert len(broken_runs) == 2

    asyncio.run(main())


def test_deadline_and_approval_timeout(nats_server: NatsServer, timeline_file: Path) -> None:
    slow = {
        "deadlineSeconds": 1,
        "steps": [{"name": "wait", "agent": "auth", "input": {"sleep": 5}}],
    }
    gated = {
        "steps": [
            {"name": "first", "agent": "auth", "input": {}},
            {
                "name": "gate",
                "agent": "support",
                "dependsOn": ["first"],
                "approval": {"required": True, "timeoutSeconds": 1, "onTimeout": "Skip"},
                "input": {},
            },
        ]
    }

    async def main() -> None:
        url = nats_server.url
        async with (
            agents(url, DIAMOND_AGENTS),
            dispatcher(url, catalog(slow=slow, gated=gated)),
            await ShoalClient.connect(url) as client,
        ):
            late = await client.submit_run(NS, "slow", {})
            gate = await client.submit_run(NS, "gated", {})
            late_state = await finished(client, late.run or "")
            gate_state = await finished(client, gate.run or "")
        assert (late_state.phase, late_state.reason) == ("Failed", "DeadlineExceeded")
        assert "1s" in late_state.message
        assert gate_state.phase == "Succeeded"
        step = gate_state.steps["gate"]
        assert (step.phase, step.reason) == ("Skipped", "ApprovalTimeout")
        assert step.approval is not None
        assert step.approval.timed_out

    asyncio.run(main())


def test_an_approval_decision_is_recorded_and_releases_the_step(
    nats_server: NatsServer, timeline_file: Path
) -> None:
    from shoal_api.runs.model import ApprovalDecided

    gated = {
        "steps": [
            {
                "name": "gate",
                "agent": "support",
                "approval": {"required": True, "timeoutSeconds": 600},
                "input": {"x": "${input.x}"},
            }
        ]
    }

    async def main() -> None:
        url = nats_server.url
        async with (
            agents(url, DIAMOND_AGENTS),
            dispatcher(url, catalog(gated=gated)) as d,
            await ShoalClient.connect(url) as client,
        ):
            reply = await client.submit_run(NS, "gated", {"x": 1})
            run = reply.run or ""
            async for state in client.watch_run(NS, run):
                if state.steps["gate"].phase == "WaitingApproval":
                    break
            decision = ApprovalDecided(step="gate", decision="Approve", approver="jane", at=1.0)
            assert (await d.decide(NS, run, decision, workflow="gated"))[0] == "Applied"
            again = await d.decide(
                NS, run, decision.model_copy(update={"approver": "joe"}), workflow="gated"
            )
            assert again[0] == "NotWaiting"
            assert (await d.decide(NS, "nope", decision, workflow="gated"))[0] == "RunNotFound"
            wrong = await d.decide(NS, run, decision, workflow="other")
            assert wrong[0] == "RunNotFound"
            state = await finished(client, run)
        assert state.phase == "Succeeded"
        approval = state.steps["gate"].approval
        assert approval is not None
        assert (approval.decision, approval.approver, approval.at) == ("Approve", "jane", 1.0)

    asyncio.run(main())


def test_idempotency_keys_bad_input_and_missing_workflows(
    nats_server: NatsServer, timeline_file: Path
) -> None:
    async def main() -> None:
        url = nats_server.url
        async with await ShoalClient.connect(url) as client:
            with pytest.raises(DispatcherUnavailableError, match="operator running"):
                await client.submit_run(NS, "customer-inquiry", {}, timeout=1)
            async with agents(url, DIAMOND_AGENTS), dispatcher(url, catalog()):
                good = {"customerId": "c", "message": "m"}
                first = await client.submit_run(NS, "customer-inquiry", good, idempotency_key="o-1")
                second = await client.submit_run(
                    NS, "customer-inquiry", good, idempotency_key="o-1"
                )
                other = await client.submit_run(NS, "customer-inquiry", good, idempotency_key="o-2")
                assert first.created
                assert not second.created
                assert first.run == second.run != other.run
                with pytest.raises(RunRejectedError, match="customerId") as bad:
                    await client.submit_run(NS, "customer-inquiry", {"message": "m"})
                assert bad.value.code == "InvalidInput"
                with pytest.raises(RunRejectedError, match="not found") as missing:
                    await client.submit_run(NS, "nope", {})
                assert missing.value.code == "WorkflowNotFound"
                await finished(client, first.run or "")
                runs = await client.list_runs(NS)
        assert {r.id for r in runs} == {first.run, other.run}

    asyncio.run(main())


def test_max_concurrent_runs_queues_the_excess(
    nats_server: NatsServer, timeline_file: Path
) -> None:
    one = {
        "maxConcurrentRuns": 2,
        "steps": [{"name": "s", "agent": "auth", "input": {"sleep": 0.3}}],
    }

    async def main() -> None:
        url = nats_server.url
        async with (
            agents(url, DIAMOND_AGENTS),
            dispatcher(url, catalog(one=one)) as d,
            await ShoalClient.connect(url) as client,
        ):
            replies = [await client.submit_run(NS, "one", {}) for _ in range(6)]
            assert {r.phase for r in replies} == {"Pending"}
            states = [await finished(client, r.run or "") for r in replies]
            tally = d.tally(NS, "one")
            registry = d.metrics.registry
            labels = {"namespace": NS, "workflow": "one"}
            succeeded = registry.get_sample_value(
                "shoal_workflow_runs_total", {**labels, "phase": "Succeeded", "reason": "Succeeded"}
            )
            created = registry.get_sample_value(
                "shoal_workflow_submissions_total", {**labels, "outcome": "Created"}
            )
            assert (succeeded, created) == (6, 6)
        assert {s.phase for s in states} == {"Succeeded"}
        assert tally is not None
        assert (tally.succeeded, tally.active, tally.queued) == (6, 0, 0)
        windows = sorted((s.started or 0, s.finished or 0) for s in states)
        for start, _ in windows:
            running = sum(1 for a, b in windows if a <= start < b)
            assert running <= 2

    asyncio.run(main())


def test_steps_share_the_run_context(nats_server: NatsServer, timeline_file: Path) -> None:
    shared = {
        "steps": [
            {
                "name": "look",
                "agent": "writer",
                "input": {"key": "profile", "value": {"tier": "gold"}},
            },
            {"name": "use", "agent": "reader", "dependsOn": ["look"], "input": {"key": "profile"}},
            {
                "name": "templ",
                "agent": "auth",
                "dependsOn": ["look"],
                "input": {"tier": "${context.profile.tier}"},
            },
        ]
    }

    async def main() -> None:
        url = nats_server.url
        specs = {**DIAMOND_AGENTS, "writer": agent_spec("remember"), "reader": agent_spec("recall")}
        async with (
            agents(url, specs),
            dispatcher(url, catalog(shared=shared)),
            await ShoalClient.connect(url) as client,
        ):
            reply = await client.submit_run(NS, "shared", {})
            state = await finished(client, reply.run or "")
        assert state.phase == "Succeeded", state
        assert state.context == {"profile": {"tier": "gold"}}
        assert state.context_version == 1
        assert state.steps["use"].output == {"value": {"tier": "gold"}, "version": 1}
        assert state.steps["templ"].output["got"]["tier"] == "gold"

    asyncio.run(main())


def test_runs_resume_after_dispatcher_and_nats_restarts(
    nats_server: NatsServer, timeline_file: Path
) -> None:
    async def main() -> None:
        url = nats_server.url
        cat = catalog()
        async with agents(url, DIAMOND_AGENTS), await ShoalClient.connect(url) as client:
            async with dispatcher(url, cat):
                replies = [
                    await client.submit_run(
                        NS,
                        "customer-inquiry",
                        {"customerId": f"c{i}", "message": "m", "category": "billing"},
                    )
                    for i in range(20)
                ]
                await asyncio.sleep(0.3)
            # No dispatcher for a moment: results wait in the stream.
            await asyncio.sleep(1.0)
            async with dispatcher(url, cat):
                await asyncio.sleep(0.3)
                nats_server.restart()
                states = [await finished(client, r.run or "", within=60) for r in replies]
        assert {s.phase for s in states} == {"Succeeded"}, [
            (n, st.phase, st.reason, st.message) for n, st in states[0].steps.items()
        ]
        executions = [(x["run"], x["step"]) for x in timeline(timeline_file)]
        assert len(executions) == len(set(executions)) == 20 * 4

    asyncio.run(main())


def test_selectors_spread_work_and_queued_runs_start_by_priority(
    nats_server: NatsServer, timeline_file: Path
) -> None:
    spread = {
        "steps": [
            {
                "name": "look",
                "agentSelector": {"capability": "lookup", "strategy": "RoundRobin"},
                "input": {},
            }
        ]
    }
    serial = {
        "maxConcurrentRuns": 1,
        "steps": [{"name": "s", "agent": "auth", "input": {"sleep": 0.2}}],
    }

    async def main() -> None:
        url = nats_server.url
        specs = {**DIAMOND_AGENTS, "lookup-a": agent_spec(), "lookup-b": agent_spec()}
        cat = StaticCatalog(
            {"spread": spread, "serial": serial},
            {"lookup-a": ["lookup"], "lookup-b": ["lookup"]},
        )
        async with (
            agents(url, specs),
            dispatcher(url, cat),
            await ShoalClient.connect(url) as client,
        ):
            spread_runs = [await client.submit_run(NS, "spread", {}) for _ in range(6)]
            low = [await client.submit_run(NS, "serial", {}, priority=1) for _ in range(4)]
            high = await client.submit_run(NS, "serial", {}, priority=9)
            spread_states = [await finished(client, r.run or "") for r in spread_runs]
            low_states = [await finished(client, r.run or "") for r in low]
            high_state = await finished(client, high.run or "")
        assert Counter(s.steps["look"].agent for s in spread_states) == {
            "lookup-a": 3,
            "lookup-b": 3,
        }
        # The first low run was already running; the high one overtook the other three.
        started_after_high = [s for s in low_states if (s.started or 0) > (high_state.started or 0)]
        assert len(started_after_high) == 3

    asyncio.run(main())


def test_timers_survive_a_dispatcher_restart(nats_server: NatsServer, timeline_file: Path) -> None:
    gated = {
        "steps": [
            {
                "name": "gate",
                "agent": "support",
                "approval": {"required": True, "timeoutSeconds": 2, "onTimeout": "Skip"},
                "input": {},
            }
        ]
    }

    async def main() -> None:
        url = nats_server.url
        cat = catalog(gated=gated)
        async with agents(url, DIAMOND_AGENTS), await ShoalClient.connect(url) as client:
            async with dispatcher(url, cat):
                reply = await client.submit_run(NS, "gated", {})
                async for state in client.watch_run(NS, reply.run or ""):
                    if state.steps["gate"].phase == "WaitingApproval":
                        break
            # The dispatcher that armed the approval timer is gone; its successor must
            # find the timer in the record.
            async with dispatcher(url, cat):
                done = await finished(client, reply.run or "")
        assert done.phase == "Succeeded"
        assert (done.steps["gate"].phase, done.steps["gate"].reason) == (
            "Skipped",
            "ApprovalTimeout",
        )

    asyncio.run(main())
