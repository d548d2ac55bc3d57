"""Workflows end to end on the local cluster: Workflow and Agents applied with kubectl,
runs submitted with the shoal CLI/SDK, step Agents served by the kubelet stand-in's
runtime processes, the dispatcher inside the operator."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal_api import nats_layout as nl
from shoal_api.envelope import Result
from shoal_cli.client import ShoalClient
from shoal_testbed.fixtures import OperatorProcess, Testbed, eventually
from tests.helpers import REPO, agent, condition, is_ready, runtimes
from tests.runtime.support import until

pytestmark = pytest.mark.cluster

HANDLER = "tests.workflows.handlers:work"


def shoal(testbed: Testbed, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal_cli.cli", *args],
        env={**os.environ, "SHOAL_NATS_URL": testbed.nats_url},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def workflow(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": spec,
    }


def diamond(sleep: float = 0.5, **fields: Any) -> dict[str, Any]:
    return {
        "input": {"type": "object", "required": ["customerId", "message"]},
        "deadlineSeconds": 120,
        "steps": [
            {
                "name": "authenticate",
                "agent": "auth",
                "input": {"customerId": "${input.customerId}"},
            },
            {
                "name": "classify",
                "agent": "triage",
                "dependsOn": ["authenticate"],
                "input": {"text": "${input.message}", "sleep": sleep},
            },
            {
                "name": "compliance",
                "agentSelector": {"capability": "compliance-check", "strategy": "LeastLag"},
                "dependsOn": ["authenticate"],
                "input": {"customerId": "${input.customerId}", "sleep": sleep},
            },
            {
                "name": "answer",
                "agent": "support",
                "dependsOn": ["classify", "compliance"],
                "when": "steps.classify.output.category != 'spam'",
                "input": {"category": "${steps.classify.output.category}"},
            },
        ],
        "output": {"answer": "${steps.answer.output}"},
        **fields,
    }


def apply_agents(testbed: Testbed, namespace: str, timeline: Path, concurrency: int = 16) -> None:
    env = {"env": [{"name": "SHOAL_TEST_TIMELINE", "value": str(timeline)}]}
    common = {"handler": {"python": HANDLER}, "concurrency": concurrency, "runtime": env}
    testbed.apply(
        [
            agent("auth", **common),
            agent("triage", **common),
            agent("compliance", capabilities=["compliance-check"], **common),
            agent("support", **common),
        ],
        namespace,
    )
    for name in ("auth", "triage", "compliance", "support"):
        eventually(partial(is_ready, testbed, name, namespace), 60, what=f"{name} Ready")
        eventually(partial(runtimes, testbed, namespace, name), 60, what=f"{name} runtime")


def read_timeline(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_diamond_runs_through_the_operator_and_mirrors_status(
    testbed: Testbed, operator: Any, namespace: str, tmp_path: Path
) -> None:
    timeline = tmp_path / "timeline.jsonl"
    apply_agents(testbed, namespace, timeline)
    testbed.apply(workflow("customer-inquiry", diamond()), namespace)
    eventually(
        lambda: is_ready(testbed, "customer-inquiry", namespace, kind="workflow"),
        60,
        what="Workflow Ready",
    )
    inquiry = {"customerId": "c-1", "message": "my invoice is wrong"}
    done = shoal(
        testbed,
        *("run", "customer-inquiry", "-n", namespace, "--input", json.dumps(inquiry)),
        *("--watch", "-o", "json"),
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["phase"] == "Succeeded"
    assert record["output"]["answer"]["by"] == "support"

    by_step = {line["step"]: line for line in read_timeline(timeline)}
    classify, compliance = by_step["classify"], by_step["compliance"]
    assert max(classify["start"], compliance["start"]) < min(classify["end"], compliance["end"])
    assert by_step["answer"]["start"] >= max(classify["end"], compliance["end"])

    def mirrored() -> dict[str, Any] | None:
        status = (testbed.get("workflow", "customer-inquiry", namespace) or {}).get("status", {})
        runs = status.get("runs") or {}
        return status if runs.get("succeeded") == 1 and runs.get("active") == 0 else None

    status = eventually(mirrored, 30, what="runs mirrored into status")
    assert status["p95DurationSeconds"] > 0
    assert status["lastRunTime"].endswith("Z")

    listed = shoal(testbed, "runs", "list", "-n", namespace, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)] == [record["id"]]


def test_bad_workflows_and_bad_input_are_refused_with_reasons(
    testbed: Testbed, operator: Any, namespace: str, tmp_path: Path
) -> None:
    apply_agents(testbed, namespace, tmp_path / "timeline.jsonl")
    broken = diamond()
    broken["steps"][3]["when"] = "steps.classify.output.category !="
    testbed.apply(workflow("broken", broken), namespace)
    testbed.apply(workflow("fine", diamond()), namespace)

    def reason() -> str | None:
        cond = condition(testbed.get("workflow", "broken", namespace), "Ready")
        return cond["reason"] if cond and cond["status"] == "False" else None

    assert eventually(reason, 60, what="Ready=False") == "InvalidCondition"
    eventually(lambda: is_ready(testbed, "fine", namespace, kind="workflow"), 60, what="Ready")

    refused = shoal(testbed, "run", "broken", "-n", namespace, "--input", "{}")
    assert refused.returncode == 2, refused.stderr
    assert "cannot run" in refused.stderr
    bad_input = shoal(testbed, "run", "fine", "-n", namespace, "--input", '{"customerId": "c"}')
    assert bad_input.returncode == 2, bad_input.stderr
    assert "message" in bad_input.stderr
    missing = shoal(testbed, "run", "nope", "-n", namespace, "--input", "{}")
    assert missing.returncode == 5, missing.stderr
    assert "not found" in missing.stderr


RUNS = 1000


def test_a_thousand_runs_survive_an_operator_kill_and_a_nats_restart(
    testbed: Testbed, operator_process: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    assert testbed.local is not None, "restarting NATS needs the local test bed"
    timeline = tmp_path / "timeline.jsonl"
    apply_agents(testbed, namespace, timeline, concurrency=64)
    testbed.apply(workflow("inquiry", diamond(sleep=0.05, deadlineSeconds=600)), namespace)
    eventually(lambda: is_ready(testbed, "inquiry", namespace, kind="workflow"), 60, what="Ready")

    async def main() -> list[Any]:
        async with await ShoalClient.connect(testbed.nats_url) as client:
            gate = asyncio.Semaphore(50)

            async def submit(i: int) -> str:
                async with gate:
                    reply = await client.submit_run(
                        namespace,
                        "inquiry",
                        {"customerId": f"c{i}", "message": "hello"},
                        idempotency_key=f"order-{i}",
                        timeout=30,
                    )
                    assert reply.run is not None
                    return reply.run

            runs = await asyncio.gather(*(submit(i) for i in range(RUNS)))
            assert len(set(runs)) == RUNS

            async def finished(at_least: int) -> bool:
                states = await client.list_runs(namespace, "inquiry")
                return sum(s.terminal for s in states) >= at_least

            async def executed(steps: int) -> bool:
                return len(read_timeline(timeline)) >= steps

            # Mid-flight: the operator dies (SIGKILL) and comes back, then NATS restarts
            # while the new operator has not yet taken over.
            await until(lambda: executed(RUNS), 180, f"{RUNS} steps executed")
            operator_process.kill()
            operator_process.wait()
            operator_process.start()
            await until(lambda: executed(2 * RUNS), 180, f"{2 * RUNS} steps executed")
            assert testbed.local is not None
            testbed.local.restart_nats(down_seconds=1.0)
            again = await client.submit_run(
                namespace,
                "inquiry",
                {"customerId": "c0", "message": "hello"},
                idempotency_key="order-0",
                timeout=30,
            )
            assert again.run == runs[0]
            assert not again.created
            try:
                await until(lambda: finished(RUNS), 200, f"all {RUNS} runs finished")
            except AssertionError:
                stuck = [s for s in await client.list_runs(namespace, "inquiry") if not s.terminal]
                print(f"{len(stuck)} runs unfinished")
                for state in stuck[:3]:
                    print(state.id, {n: (st.phase, st.task_id) for n, st in state.steps.items()})
                    for st in state.steps.values():
                        if st.task_id:
                            print(st.task_id, await client.get_result(namespace, st.task_id))
                print(
                    "\n".join(
                        line
                        for line in operator_process.output().splitlines()
                        if "WARNING" in line or "ERROR" in line
                    )[-5000:]
                )
                for name in ("triage", "compliance"):
                    for cname in nl.consumer_names(namespace, name):
                        info = await client.js.consumer_info(nl.TASKS_STREAM, cname)
                        print(cname, info.num_pending, info.num_ack_pending, info.num_waiting)
                info = await client.js.consumer_info(nl.RESULTS_STREAM, nl.DISPATCHER_CONSUMER)
                print("dispatcher consumer", info)
                print(
                    [
                        line
                        for line in operator_process.output().splitlines()
                        if "leader" in line or "dispatcher started" in line or "slow" in line
                    ]
                )
                assert testbed.local is not None
                for log in sorted((testbed.local.logs / "pods").glob(f"{namespace}_triage-*")):
                    print(log.name, log.read_text(errors="replace")[-3000:])
                raise
            return await client.list_runs(namespace, "inquiry")

    try:
        states = asyncio.run(main())
    except BaseException:
        print(operator_process.output()[-6000:])
        raise
    assert Counter(s.phase for s in states) == {"Succeeded": RUNS}, operator_process.output()[
        -3000:
    ]
    # Every step's result is recorded exactly once...
    results = asyncio.run(_results(testbed.nats_url, namespace))
    per_task = Counter(r.id for r in results if r.run is not None)
    assert len(per_task) == RUNS * 4
    assert set(per_task.values()) == {1}
    # ...and no step ran again once its result was recorded.
    recorded = {r.id: r.finished for r in results}
    ran_after = [line for line in read_timeline(timeline) if line["start"] > recorded[line["task"]]]
    assert ran_after == []
    # The restarted operator's dispatcher reports what it finished and how fast.
    scraped = httpx.get(operator_process.metrics_url, timeout=10).text
    finished = _sample(scraped, "shoal_workflow_runs_total", 'phase="Succeeded"')
    assert 0 < finished <= RUNS
    assert _sample(scraped, "shoal_workflow_dispatch_seconds_count") > 0
    assert _sample(scraped, "shoal_workflow_runs_active", 'workflow="inquiry"') == 0


def _sample(text: str, name: str, having: str = "") -> float:
    """The sum of a metric's samples (whose labels contain ``having``) in an exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and having in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _results(url: str, namespace: str) -> list[Result]:
    async with await ShoalClient.connect(url) as client:
        sub = await client.js.subscribe(
            nl.result_subject(namespace, "*"), stream=nl.RESULTS_STREAM, ordered_consumer=True
        )
        info = await client.js.stream_info(nl.RESULTS_STREAM)
        out: list[Result] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=2)
                out.append(Result.model_validate_json(msg.data))
                if msg.metadata.sequence.stream >= info.state.last_seq:
                    break
        except TimeoutError:
            pass
        finally:
            await sub.unsubscribe()
        return out
