"""The example Agents of examples/: served by real runtimes (triage batches, escalates
its unsure answers to triage-large, and caches), and the customer-inquiry handlers called
directly with a fake run context, alone and driven through the run engine."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

import pytest

from shoal_api.runs.model import (
    ApprovalDecided,
    AwaitApproval,
    DispatchTask,
    Event,
    RunFinished,
    RunState,
    Started,
    StepResult,
)
from shoal_api.workflow import WorkflowSpec
from shoal_core.runs.engine import advance
from shoal_examples import auth, compliance, crm, support, triage
from shoal_runtime.handler_loading import import_callable
from shoal_runtime.sdk import Context, ContextConflict, PermanentError, RunContext
from shoal_testbed.fixtures import NatsServer
from tests.helpers import EXAMPLES, example_docs
from tests.runtime.support import connect, declare, result_map, running, submit


def _spec(name: str) -> dict[str, Any]:
    docs = example_docs(recursive=True)
    spec: dict[str, Any] = next(
        d["spec"] for d in docs if d["kind"] == "Agent" and d["metadata"]["name"] == name
    )
    return spec


@pytest.mark.nats
def test_triage_example_classifies_escalates_and_caches(nats_server: NatsServer) -> None:
    specs = {name: _spec(name) for name in ("triage", "triage-small", "triage-large")}

    async def main() -> None:
        for name, spec in specs.items():
            await declare(nats_server.url, name, spec)
        nc, js = await connect(nats_server.url)
        async with (
            running(nats_server.url, "triage", specs["triage"]),
            running(nats_server.url, "triage-small", specs["triage-small"]),
            running(nats_server.url, "triage-large", specs["triage-large"]),
        ):
            billing = await submit(js, "triage", {"text": "My invoice shows a double charge"})
            vague = await submit(js, "triage", {"text": "Hello, a question"})
            got = await result_map(js, 2)
            again = await submit(js, "triage", {"text": "My invoice shows a double charge"})
            got = await result_map(js, 3)
        assert got[billing.id].output == {"category": "billing", "confidence": 0.95}
        assert got[billing.id].path == ("triage",)
        assert got[vague.id].path == ("triage", "triage-large")
        assert got[vague.id].output == {"category": "general", "model": "large"}
        assert got[again.id].cached
        await nc.close()

    asyncio.run(main())


# -- the customer-inquiry handlers, without NATS -------------------------------------------


class FakeShared:
    """An in-memory run context with RunContext's get/put semantics: a version that moves
    when a value changes, and ContextConflict for a write on a stale version."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.version = 0
        self.interloper: dict[str, Any] = {}
        """Written by "another step" right after the next get (to provoke a conflict)."""

    async def get(self, key: str, default: Any = None) -> tuple[Any, int]:
        value, version = self.values.get(key, default), self.version
        if self.interloper:
            self.values.update(self.interloper)
            self.version += 1
            self.interloper = {}
        return value, version

    async def put(self, key: str, value: Any, *, version: int | None = None) -> int:
        if version is not None and version != self.version:
            raise ContextConflict(version, self.version)
        if self.values.get(key) != value:
            self.values[key] = value
            self.version += 1
        return self.version


def context(agent: str, shared: FakeShared | None = None) -> Context:
    return Context(
        task_id=f"t-{agent}",
        agent=agent,
        namespace="support",
        run="r-1" if shared is not None else None,
        shared=cast(RunContext, shared),
    )


def no_crm(customer_id: str) -> crm.Profile:
    raise AssertionError(f"the CRM was queried for {customer_id}")


def test_auth_shares_the_profile_in_the_run_context() -> None:
    shared = FakeShared()
    out = asyncio.run(auth.handle({"customerId": "c-1001"}, context("auth", shared)))
    assert out == {"customerId": "c-1001", "authenticated": True, "tier": "premium"}
    assert shared.values[auth.PROFILE_KEY] == crm.CUSTOMERS["c-1001"]
    # A retried attempt writes the same profile: not a new version.
    asyncio.run(auth.handle({"customerId": "c-1001"}, context("auth", shared)))
    assert shared.version == 1
    # Outside a run (shoal submit auth) there is no context to share with.
    assert asyncio.run(auth.handle({"customerId": "c-1002"}, context("auth")))["tier"] == "plus"


@pytest.mark.parametrize("input", [{"customerId": "c-9999"}, {}], ids=["unknown", "missing"])
def test_auth_refuses_unknown_customers_permanently(input: dict[str, Any]) -> None:
    with pytest.raises(PermanentError):
        asyncio.run(auth.handle(input, context("auth", FakeShared())))


def test_compliance_reuses_the_profile_auth_stored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shared = FakeShared()
    asyncio.run(auth.handle({"customerId": "c-1001"}, context("auth", shared)))
    monkeypatch.setattr(crm, "lookup", no_crm)
    with caplog.at_level(logging.INFO, logger="shoal.handler"):
        out = asyncio.run(
            compliance.handle({"customerId": "c-1001"}, context("compliance-b", shared))
        )
    assert out == {
        "customerId": "c-1001",
        "allowed": True,
        "flags": [],
        "checkedBy": "compliance-b",
        "profileSource": "run-context",
    }
    assert "compliance-b reused the profile of c-1001 from run r-1" in caplog.text


def test_compliance_asks_the_crm_without_a_shared_profile_and_shares_it() -> None:
    shared = FakeShared()
    out = asyncio.run(compliance.handle({"customerId": "c-1003"}, context("compliance-a", shared)))
    assert out["profileSource"] == "crm"
    assert (out["allowed"], out["flags"]) == (False, ["sanctioned-region:KP"])
    assert shared.values[auth.PROFILE_KEY]["customerId"] == "c-1003"
    # Outside a run: the CRM, nothing to share.
    alone = asyncio.run(compliance.handle({"customerId": "c-1002"}, context("compliance-a")))
    assert (alone["profileSource"], alone["allowed"]) == ("crm", True)


def test_compliance_keeps_what_another_step_stored_meanwhile() -> None:
    shared = FakeShared()
    theirs = {**crm.CUSTOMERS["c-1002"], "note": "stored by another step"}
    shared.interloper = {auth.PROFILE_KEY: theirs}
    out = asyncio.run(compliance.handle({"customerId": "c-1002"}, context("compliance-a", shared)))
    assert out["profileSource"] == "crm"
    assert shared.values[auth.PROFILE_KEY] == theirs  # the conditional write did not clobber it


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("I was charged twice on my last invoice", "billing"),
        ("The app shows an error at login", "technical"),
        ("You are a lottery winner, click here", "spam"),
        ("Hello, I have a question", "general"),
    ],
)
def test_triage_keyword_rules(text: str, category: str) -> None:
    assert triage.classify(text)[0] == category
    (out,) = asyncio.run(triage.handle([{"text": text}], context("triage")))
    assert out["category"] == category


def test_support_greets_by_the_shared_name_and_falls_back_to_a_template() -> None:
    shared = FakeShared()
    asyncio.run(auth.handle({"customerId": "c-1001"}, context("auth", shared)))
    input = {"text": "refund please", "category": "billing"}
    out = asyncio.run(support.handle(input, context("support", shared)))
    assert out["answer"].startswith("Hello Ada Example! We have received your billing question")
    assert out["category"] == "billing"
    assert asyncio.run(support.handle(input, context("support")))["answer"].startswith("Hello! ")
    basic = asyncio.run(support.handle_basic(input, context("support-basic")))
    assert basic == {
        "answer": support.TEMPLATES["general"],
        "category": "general",
        "fallback": True,
    }


# -- the customer-inquiry Workflow with its Agents -----------------------------------------


def _workflow() -> WorkflowSpec:
    (doc,) = [d for d in example_docs() if d["kind"] == "Workflow"]
    return WorkflowSpec.model_validate(doc["spec"])


def _agents() -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]
        for d in example_docs(recursive=True)
        if d["kind"] == "Agent"
    }


def test_customer_inquiry_refers_to_agents_that_exist_with_handlers() -> None:
    spec, agents = _workflow(), _agents()
    for step in spec.steps:
        if step.agent_selector is not None:
            able = [
                n
                for n, a in agents.items()
                if step.agent_selector.capability in a.get("capabilities", [])
            ]
            assert len(able) >= 2, f"step {step.name}: the selector should have a choice"
        else:
            assert step.agent is not None, step.name
            assert step.agent in agents, step.name
        if step.fallback is not None:
            assert step.fallback.agent in agents
    for name, agent in agents.items():
        assert callable(import_callable(agent["handler"]["python"])), name


async def _drive(input: dict[str, Any]) -> tuple[RunState, list[str]]:
    """One run of the example through the pure engine, each task served by the example
    handler of the Agent it names (the first able Agent for a selector), the approval
    granted when asked for; the run's end state and the Agents that served it."""
    spec, agents, shared = _workflow(), _agents(), FakeShared()
    state = RunState.new(
        spec, run_id="r-1", workflow="customer-inquiry", namespace="support", input=input, now=0.0
    )
    served: list[str] = []
    pending: list[Event] = [Started()]
    while pending:
        state, effects = advance(spec, state, pending.pop(0), 1.0)
        for effect in effects:
            if isinstance(effect, DispatchTask):
                name = effect.agent or min(
                    n
                    for n, a in agents.items()
                    if effect.selector is not None
                    and effect.selector.capability in a.get("capabilities", [])
                )
                handler = import_callable(agents[name]["handler"]["python"])
                ctx = context(name, shared)
                if "batching" in agents[name]:
                    (output,) = await handler([effect.input], ctx)
                else:
                    output = await handler(effect.input, ctx)
                served.append(name)
                pending.append(
                    StepResult(
                        step=effect.step,
                        task_id=effect.task_id,
                        status="Succeeded",
                        output=output,
                        path=(name,),
                    )
                )
            elif isinstance(effect, AwaitApproval):
                pending.append(
                    ApprovalDecided(step=effect.step, decision="Approve", approver="jane", at=1.0)
                )
            elif isinstance(effect, RunFinished):
                assert not pending
    return state, served


def _input(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / "inputs" / name).read_text())
    return data


def test_customer_inquiry_example_input_is_answered_after_approval() -> None:
    state, served = asyncio.run(_drive(_input("inquiry.json")))
    assert state.phase == "Succeeded", state.message
    assert served[0] == "auth"
    assert sorted(served[1:3]) == ["compliance-a", "triage"]
    assert served[3:] == ["support"]
    assert state.steps["compliance"].output["profileSource"] == "run-context"
    approval = state.steps["answer"].approval
    assert approval is not None
    assert approval.decision == "Approve"
    assert state.output["answer"]["category"] == "billing"
    assert state.output["answer"]["answer"].startswith("Hello Ada Example!")


def test_customer_inquiry_example_spam_gets_no_answer() -> None:
    state, served = asyncio.run(_drive(_input("spam.json")))
    assert state.phase == "Succeeded", state.message
    assert "support" not in served
    assert state.steps["classify"].output["category"] == "spam"
    assert (state.steps["answer"].phase, state.steps["answer"].reason) == ("Skipped", "WhenFalse")
    assert state.steps["answer"].approval is None
