"""Workflow dispatch: the diamond DAG through the Shoal dispatcher vs a sequential client.

The diamond: authenticate -> (classify || compliance) -> answer, every step a no-op
handler (``bench.noop_handler:handle``, returns its input) on its own Agent. One
nats-server (JetStream in a temp dir) and, each as its own process as in a cluster:

- four ``python -m shoal_runtime`` processes (auth, triage, compliance, support), their
  streams, buckets and consumers declared the way the operator declares them, each at
  concurrency 64. Processes rather than in-process runtimes: on 2 cores, seven event
  loops in one process would measure the contention of one loop, not dispatch;
- the dispatcher (``shoal_operator.runs.Dispatcher``, unchanged, fed by a static
  catalog instead of the operator's watch cache) in a process of its own, as in the
  operator. A thin subclass notes two wall-clock times for the benchmark: a result's
  arrival, and the publish acknowledgement of the tasks it led to.

Two systems run the same four tasks per run on the same runtimes:

- Shoal dispatcher: runs submitted with ``ShoalClient.submit_run``;
- baseline, a sequential client: what one writes without a DAG dispatcher, each step's
  task submitted with the SDK (``ShoalClient.run_task``: watch the result, publish, wait)
  and its result awaited before the next (classify and compliance one after the other).

Measured, alternated so that noise on the machine hits both alike:

1. latency, one run at a time (runs of the two systems interleaved);
2. latency under a load both carry: runs started at a steady rate (``--rate``, 100/s),
   each on its own; rounds alternated;
3. throughput: N runs driven with the same concurrency (the dispatcher: N runs
   submitted by 200 concurrent submitters, the Workflow's ``maxConcurrentRuns`` at the
   CRD default; the baseline: 200 runs in flight), from the first submission to the last
   run finished (the dispatcher storing its terminal record; the baseline client
   receiving the last step's result). Median of the rounds; latency here is queueing.

Dispatch latency, per step that waits on others, from the JetStream timestamp of the
result it waited for (the last of them) in SHOAL_RESULTS to its own task being stored in
SHOAL_TASKS (the publish acknowledgement reaching the publisher: the dispatcher, or the
baseline client). SHOAL_TASKS is a work queue (acknowledged tasks are deleted), so the
task side is the publish acknowledgement; both are read on the same host, so the server's
and the processes' wall clocks are the same clock. Also reported: the dispatcher's own
``dispatch_latency`` (a result's arrival -> its dependents' tasks acknowledged and the
run's record stored) and the hand-off (result stored -> the next step's task taken up by
its runtime, the result's ``started``).

Writes bench/results/workflow.json and bench/results/workflow.md (``--quick`` prints the
table only, unless ``--out`` is given). ``--profile FILE`` adds two dispatcher rounds under
cProfile in the dispatcher's process (saturated -> FILE, paced -> FILE.paced; not part of
the figures) and prints where its time went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import results_meta
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck

from shoal_api import nats_layout as nl
from shoal_api.envelope import MSG_ID_HEADER, Result, Task
from shoal_api.workflow import WorkflowSpec
from shoal_cli.client import ShoalClient
from shoal_core.runs.engine import task_id_for
from shoal_operator.runs import Catalog, Dispatcher, WorkflowView, view_of

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
NS = "bench"
WORKFLOW = "diamond"
HANDLER = "bench.noop_handler:handle"
CONCURRENCY = 64
STEP_AGENTS = {"authenticate": "auth", "classify": "triage", "compliance": "compliance"}
STEP_AGENTS["answer"] = "support"
DIAMOND: dict[str, Any] = {
    "input": {"type": "object", "required": ["customerId", "message"]},
    "deadlineSeconds": 600,
    "steps": [
        {"name": "authenticate", "agent": "auth", "input": {"customerId": "${input.customerId}"}},
        {
            "name": "classify",
            "agent": "triage",
            "dependsOn": ["authenticate"],
            "input": {"text": "${input.message}", "category": "${input.category}"},
        },
        {
            "name": "compliance",
            "agent": "compliance",
            "dependsOn": ["authenticate"],
            "input": {"customerId": "${input.customerId}"},
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
# Control subjects between this process and the dispatcher's.
CTL = "bench.workflow"
TASK_PREFIX = nl.TASK_SUBJECTS.removesuffix(">") + f"{NS}."
READY_LIMIT = 60.0
MAX_RESULT_CONSUMERS = 100_000
RESULT_TIMEOUT = 60.0

GOAL_P50_MS = 2.0
GOAL_P99_MS = 10.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class PhaseError(RuntimeError):
    """A system could not be measured (a process died, runs failed or never finished)."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_input(i: int) -> dict[str, Any]:
    return {"customerId": f"c{i}", "message": "refund please", "category": "billing"}


# --- the dispatcher's process ----------------------------------------------------------


class OneWorkflow:
    """The catalog: the diamond in namespace ``bench`` (the operator's cache, in short)."""

    def __init__(self) -> None:
        self.view = view_of(WorkflowSpec.model_validate(DIAMOND))

    def workflow(self, namespace: str, name: str) -> WorkflowView | None:
        return self.view if (namespace, name) == (NS, WORKFLOW) else None

    def capable(self, namespace: str, capability: str) -> list[str]:
        return []


class ProbedDispatcher(Dispatcher):
    """The dispatcher, unchanged, plus two wall-clock notes for the benchmark: when each
    result arrived (by task id), and when each task it published was acknowledged by the
    tasks stream (by task id; its JetStream publish wrapped on this instance)."""

    def __init__(self, nc: Client, catalog: Catalog, on_tally: Callable[[str, str], None]) -> None:
        super().__init__(nc, catalog, on_tally=on_tally)
        self.arrived: dict[str, float] = {}
        self.acked: dict[str, float] = {}
        publish = self.js.publish

        async def noted(subject: str, payload: bytes = b"", **kw: Any) -> PubAck:
            ack = await publish(subject, payload, **kw)
            headers = kw.get("headers") or {}
            if subject.startswith(TASK_PREFIX) and MSG_ID_HEADER in headers:
                # Nats-Msg-Id of a task: <task id>.<replays>[.<hop>]
                self.acked[str(headers[MSG_ID_HEADER]).split(".", 1)[0]] = time.time()
            return ack

        self.js.publish = noted  # type: ignore[method-assign,assignment]

    async def _on_result(self, msg: Msg) -> None:
        self.arrived[msg.subject.rsplit(".", 1)[1]] = time.time()
        await super()._on_result(msg)


async def dispatcher_process(url: str) -> None:
    """``--dispatcher URL``: the dispatcher, controlled on ``bench.workflow.*``.

    - ``expect`` {"more": k}: announce on ``bench.workflow.done`` once k more runs are
      finished (the moment the dispatcher stored the k-th terminal record);
    - ``dump`` {"path": p}: write the notes (and ``dispatch_latency``) to p, then forget them;
    - ``profile`` {"on": bool, "path": p}: cProfile this process; stats to p when turned off;
    - ``ping``: answered once the dispatcher takes submissions.
    """
    logging.basicConfig(level=logging.WARNING)
    nc = await nats.connect(url, name="bench-dispatcher", max_reconnect_attempts=-1)
    target: list[int] = []
    profiler: list[cProfile.Profile] = []
    pending: set[asyncio.Future[None]] = set()

    def finished() -> int:
        tally = d.tally(NS, WORKFLOW)
        return 0 if tally is None else tally.succeeded + tally.failed

    def on_tally(namespace: str, workflow: str) -> None:
        if target and finished() >= target[0]:
            tally = d.tally(NS, WORKFLOW)
            body = {"target": target.pop(), "at": time.time()}
            body["failed"] = 0 if tally is None else tally.failed
            sending = asyncio.ensure_future(nc.publish(f"{CTL}.done", json.dumps(body).encode()))
            pending.add(sending)
            sending.add_done_callback(pending.discard)

    d = ProbedDispatcher(nc, OneWorkflow(), on_tally)

    async def on_ctl(msg: Msg) -> None:
        what = msg.subject.rsplit(".", 1)[1]
        req = json.loads(msg.data or b"{}")
        reply: dict[str, Any] = {"ok": True}
        if what == "expect":
            target[:] = [finished() + int(req["more"])]
            reply["target"] = target[0]
        elif what == "dump":
            notes = {
                "dispatch_latency": list(d.dispatch_latency),
                "arrived": d.arrived,
                "acked": d.acked,
                "finished": finished(),
            }
            Path(req["path"]).write_text(json.dumps(notes))
            d.dispatch_latency.clear()
            d.arrived, d.acked = {}, {}
        elif what == "profile":
            if req["on"]:
                profiler[:] = [cProfile.Profile()]
                profiler[0].enable()
            elif profiler:
                profiler[0].disable()
                profiler.pop().dump_stats(req["path"])
        await msg.respond(json.dumps(reply).encode())

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await d.start()
    await nc.subscribe(f"{CTL}.ctl.*", cb=on_ctl)
    await nc.flush()
    await stop.wait()
    await d.stop()
    await nc.close()


# --- processes -------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    logf: Path

    @classmethod
    def start(
        cls, name: str, argv: list[str], tmp: Path, env: dict[str, str] | None = None
    ) -> Proc:
        logf = tmp / f"{name}.log"
        with logf.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        return cls(name, proc, logf)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.logf.read_text(errors="replace")[-3000:] if self.logf.exists() else ""
            raise PhaseError(f"{self.name} exited with code {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def cpu_seconds(self) -> float:
        """User + system CPU of the process so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()


def start_nats(tmp: Path) -> tuple[Proc, str]:
    from shoal_testbed.binaries import nats_server_bin

    port = free_port()
    argv = [str(nats_server_bin()), "-a", "127.0.0.1", "-p", str(port)]
    argv += ["-js", "-sd", str(tmp / "jetstream")]
    return Proc.start("nats-server", argv, tmp), f"nats://127.0.0.1:{port}"


async def wait_port(url: str, server: Proc) -> None:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    deadline = time.monotonic() + 20
    while True:
        server.check_alive()
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            if time.monotonic() > deadline:
                raise PhaseError(f"nats-server at {url} never accepted a connection") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def declare_agents(url: str) -> dict[str, str]:
    """The four Agents' streams, buckets and consumers, the operator's way; returns each
    Agent's runtime configuration (the pod's ``SHOAL_AGENT_CONFIG``)."""
    from shoal_api.agent import AgentSpec
    from shoal_operator.builders import jetstream
    from shoal_operator.builders.common import Owner
    from shoal_operator.builders.deployment import runtime_config
    from shoal_operator.clients.jetstream import JetStreamAdmin

    spec = AgentSpec.model_validate({"handler": {"python": HANDLER}, "concurrency": CONCURRENCY})
    admin = await JetStreamAdmin.connect(url)
    configs: dict[str, str] = {}
    try:
        await admin.ensure_streams()
        await admin.ensure_buckets()
        for agent in STEP_AGENTS.values():
            await admin.ensure_consumers(jetstream.consumers(NS, agent, spec, 1))
            owner = Owner("Agent", NS, agent, "00000000-0000-0000-0000-000000000000")
            configs[agent] = runtime_config(owner, spec)
        # nats-server 2.15 caps every stream at 1,000 consumers unless its config says
        # otherwise, and the SDK's result watch (run_task) leaves one ephemeral consumer
        # per task for 5 s: the baseline needs more than that. Raised here, for the
        # benchmark only (the operator declares no limit).
        info = await admin.js.stream_info(nl.RESULTS_STREAM)
        info.config.max_consumers = MAX_RESULT_CONSUMERS
        await admin.js.update_stream(info.config)
    finally:
        await admin.close()
    return configs


def start_runtime(url: str, agent: str, config: str, tmp: Path) -> Proc:
    from shoal_api.pod_contract import CONFIG_ENV

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path[1:]]),
        "SHOAL_NATS_URL": url,
        "SHOAL_NAMESPACE": NS,
        "SHOAL_AGENT": agent,
        "SHOAL_POD_NAME": f"{agent}-0",
        "SHOAL_HEALTH_PORT": str(free_port()),
        "SHOAL_METRICS_PORT": str(free_port()),
        "SHOAL_LOG_LEVEL": "WARNING",
        CONFIG_ENV: config,
    }
    return Proc.start(f"runtime-{agent}", [sys.executable, "-m", "shoal_runtime"], tmp, env)


# --- what the streams stored -------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """A result record as SHOAL_RESULTS holds it."""

    at: float
    """JetStream's timestamp of the message: when the result was stored (Unix s)."""
    started: float | None
    """When the step's runtime took its task up (the result's ``started``)."""
    ok: bool


async def next_result_seq(js: JetStreamContext) -> int:
    return (await js.stream_info(nl.RESULTS_STREAM)).state.last_seq + 1


async def read_results(js: JetStreamContext, start_seq: int) -> dict[str, Stored]:
    """Every result of the namespace from ``start_seq`` on, by task id."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30,
        mem_storage=True,
    )
    sub = await js.pull_subscribe(
        nl.result_subject(NS, ">"), stream=nl.RESULTS_STREAM, config=config
    )
    out: dict[str, Stored] = {}
    name: str | None = None
    try:
        info = await sub.consumer_info()
        name, pending = info.name, info.num_pending or 0
        while pending > 0:
            msgs = await sub.fetch(min(pending, 1000), timeout=10)
            pending -= len(msgs)
            for msg in msgs:
                body = json.loads(msg.data)
                out[body["id"]] = Stored(
                    msg.metadata.timestamp.timestamp(),
                    body.get("started"),
                    body.get("status") == "Succeeded",
                )
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if name is not None:
            with contextlib.suppress(Exception):
                await js.delete_consumer(nl.RESULTS_STREAM, name)
    return out


@dataclass
class Samples:
    """Latency samples (seconds) of one phase of one system."""

    dispatch: list[float] = field(default_factory=list)
    """Result stored -> the dependent's task stored (its publish acknowledged)."""
    handoff: list[float] = field(default_factory=list)
    """Result stored -> the dependent's task taken up by its runtime."""
    own: list[float] = field(default_factory=list)
    """The dispatcher's ``dispatch_latency``: arrival -> tasks acked + record stored."""
    delivery: list[float] = field(default_factory=list)
    """Result stored -> its arrival at the dispatcher."""

    def extend(self, other: Samples) -> None:
        self.dispatch += other.dispatch
        self.handoff += other.handoff
        self.own += other.own
        self.delivery += other.delivery

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("dispatch", "handoff", "own", "delivery"):
            values: list[float] = getattr(self, name)
            if values:
                out[name] = {
                    "samples": len(values),
                    "p50_ms": 1000 * statistics.median(values),
                    "p99_ms": 1000 * percentile(values, 0.99),
                    "max_ms": 1000 * max(values),
                }
        return out


def run_samples(
    runs: list[str],
    stored: dict[str, Stored],
    acked: dict[str, float],
    task_id: Callable[[str, str], str],
    chain: list[tuple[list[str], list[str]]],
) -> Samples:
    """Per run, per hand-over in ``chain`` (steps waited for -> steps dispatched next):
    from the last awaited result stored to the next tasks' acknowledgement (the last of
    them, one sample) and to each next task's start (one sample each)."""
    out = Samples()
    for run in runs:
        ids = {step: task_id(run, step) for step in STEP_AGENTS}
        missing = [i for i in ids.values() if i not in stored or not stored[i].ok]
        if missing:
            raise PhaseError(f"run {run}: no successful result of {missing[0]}")
        for before, after in chain:
            ready = max(stored[ids[s]].at for s in before)
            out.dispatch.append(max(acked[ids[s]] for s in after) - ready)
            for s in after:
                started = stored[ids[s]].started
                if started is not None:
                    out.handoff.append(started - ready)
    return out


DIAMOND_CHAIN = [
    (["authenticate"], ["classify", "compliance"]),
    (["classify", "compliance"], ["answer"]),
]
SEQUENTIAL_CHAIN = [
    (["authenticate"], ["classify"]),
    (["classify"], ["compliance"]),
    (["compliance"], ["answer"]),
]


def dispatcher_task_id(run: str, step: str) -> str:
    return task_id_for(run, step, 1)


def naive_task_id(run: str, step: str) -> str:
    return f"{run}-{step}"


# --- the two systems ---------------------------------------------------------------------


@dataclass
class Bed:
    url: str
    tmp: Path
    server: Proc
    dispatcher: Proc
    runtimes: list[Proc]
    client: ShoalClient
    """Submits runs, and drives the baseline's tasks."""
    ctl: Client
    """Talks to the dispatcher's process; reads the results stream back."""
    done: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    dumps: Iterator[int] = field(default_factory=itertools.count)

    def check_alive(self) -> None:
        for p in (self.server, self.dispatcher, *self.runtimes):
            p.check_alive()

    async def request(self, what: str, body: dict[str, Any]) -> dict[str, Any]:
        msg = await self.ctl.request(f"{CTL}.ctl.{what}", json.dumps(body).encode(), timeout=30)
        reply: dict[str, Any] = json.loads(msg.data)
        return reply

    async def on_done(self, msg: Msg) -> None:
        body = json.loads(msg.data)
        fut = self.done.pop(body["target"], None)
        if fut is not None and not fut.done():
            fut.set_result(body)

    async def expect(self, more: int) -> asyncio.Future[dict[str, Any]]:
        """A future for the moment ``more`` more runs are finished."""
        target = int((await self.request("expect", {"more": more}))["target"])
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.done[target] = fut
        return fut

    async def wait(self, fut: Awaitable[T], what: str, limit: float) -> T:
        started = time.monotonic()
        task = asyncio.ensure_future(fut)
        while True:
            done, _ = await asyncio.wait({task}, timeout=2)
            if done:
                return task.result()
            self.check_alive()
            if time.monotonic() - started > limit:
                task.cancel()
                raise PhaseError(f"{what}: not finished after {limit:.0f}s")

    async def dump(self) -> dict[str, Any]:
        path = self.tmp / f"dump-{next(self.dumps)}.json"
        await self.request("dump", {"path": str(path)})
        notes: dict[str, Any] = json.loads(path.read_text())
        path.unlink()
        return notes


class CpuMeter:
    """CPU spent during a timed section by the dispatcher, the four runtimes, nats-server
    and this process (submitting runs, or driving the baseline's tasks)."""

    def __init__(self, bed: Bed) -> None:
        self.bed = bed

    def _now(self) -> dict[str, float]:
        return {
            "dispatcher": self.bed.dispatcher.cpu_seconds(),
            "runtimes": sum(p.cpu_seconds() for p in self.bed.runtimes),
            "server": self.bed.server.cpu_seconds(),
            "client": time.process_time(),
        }

    def __enter__(self) -> CpuMeter:
        self.start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._now()

    def per_run_ms(self, n: int) -> dict[str, float]:
        return {k: 1000 * (self.end[k] - self.start[k]) / n for k in self.start}


async def submit_runs(bed: Bed, n: int, concurrency: int, offset: int) -> list[str]:
    runs: list[str] = []
    counter = itertools.count()

    async def submitter() -> None:
        while (i := next(counter)) < n:
            reply = await bed.client.submit_run(NS, WORKFLOW, run_input(offset + i), timeout=30)
            assert reply.run is not None
            runs.append(reply.run)

    await asyncio.gather(*(submitter() for _ in range(min(concurrency, n))))
    return runs


async def dispatcher_batch(
    bed: Bed, n: int, concurrency: int, offset: int, limit: float
) -> tuple[list[str], float, float]:
    """N runs through the dispatcher: (run ids, seconds to the last one finished,
    seconds spent submitting)."""
    fut = await bed.expect(n)
    started = time.time()
    runs = await submit_runs(bed, n, concurrency, offset)
    submitted = time.time() - started
    done = await bed.wait(fut, f"{n} dispatcher runs", limit)
    if done["failed"]:
        raise PhaseError(f"dispatcher: {done['failed']} runs failed")
    return runs, float(done["at"]) - started, submitted


async def dispatcher_samples(bed: Bed, runs: list[str], start_seq: int) -> Samples:
    notes = await bed.dump()
    stored = await read_results(bed.ctl.jetstream(), start_seq)
    out = run_samples(runs, stored, notes["acked"], dispatcher_task_id, DIAMOND_CHAIN)
    out.own = [float(x) for x in notes["dispatch_latency"]]
    arrived: dict[str, float] = notes["arrived"]
    for run in runs:
        for step in STEP_AGENTS:
            tid = dispatcher_task_id(run, step)
            if tid in arrived:
                out.delivery.append(arrived[tid] - stored[tid].at)
    return out


async def naive_step(
    client: ShoalClient, agent: str, task_id: str, input: Any, acked: dict[str, float]
) -> Result:
    """``ShoalClient.run_task``'s own steps, with the publish acknowledgement noted."""
    task = Task(id=task_id, input=input)
    async with client.watch_result(NS, task.id, min_replays=task.replays) as watch:
        await client.publish_task(NS, agent, task)
        acked[task_id] = time.time()
        result = await watch.wait(RESULT_TIMEOUT)
    if result.status != "Succeeded":
        raise PhaseError(f"baseline: task {task_id} {result.status}: {result.message}")
    return result


async def naive_run(client: ShoalClient, run: str, i: int, acked: dict[str, float]) -> None:
    """The diamond by hand: each step's task submitted once the one before has its result."""
    inp = run_input(i)
    await naive_step(
        client, "auth", f"{run}-authenticate", {"customerId": inp["customerId"]}, acked
    )
    text, category = inp["message"], inp["category"]
    classify = await naive_step(
        client, "triage", f"{run}-classify", {"text": text, "category": category}, acked
    )
    await naive_step(
        client, "compliance", f"{run}-compliance", {"customerId": inp["customerId"]}, acked
    )
    category = classify.output["category"]
    if category != "spam":
        await naive_step(
            client, "support", f"{run}-answer", {"text": text, "category": category}, acked
        )


async def naive_batch(
    bed: Bed, n: int, concurrency: int, tag: str, acked: dict[str, float]
) -> tuple[list[str], float]:
    runs = [f"{tag}x{i}" for i in range(n)]
    counter = itertools.count()

    async def driver() -> None:
        while (i := next(counter)) < n:
            await naive_run(bed.client, runs[i], i, acked)

    started = time.time()
    await asyncio.gather(*(driver() for _ in range(min(concurrency, n))))
    return runs, time.time() - started


async def naive_samples(
    bed: Bed, runs: list[str], acked: dict[str, float], start_seq: int
) -> Samples:
    stored = await read_results(bed.ctl.jetstream(), start_seq)
    return run_samples(runs, stored, acked, naive_task_id, SEQUENTIAL_CHAIN)


# --- the phases -----------------------------------------------------------------------------


async def warm_up(bed: Bed, warm: int, concurrency: int) -> None:
    log(f"  readiness: one run through each system (up to {READY_LIMIT:.0f}s)")
    deadline = time.monotonic() + READY_LIMIT
    while True:
        try:
            # The control subscription comes after Dispatcher.start(): an answer means
            # submissions are taken.
            await bed.request("ping", {})
            break
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            bed.check_alive()
            if time.monotonic() > deadline:
                raise PhaseError("the dispatcher's process never answered") from None
            await asyncio.sleep(0.2)
    await dispatcher_batch(bed, 1, 1, 0, READY_LIMIT)
    await naive_batch(bed, 1, 1, "ready", {})
    log(f"  warm-up: {warm} runs through each system")
    await dispatcher_batch(bed, warm, concurrency, 0, READY_LIMIT)
    await naive_batch(bed, warm, concurrency, "warm", {})
    await bed.dump()


async def latency_phase(bed: Bed, k: int) -> tuple[Samples, Samples]:
    """K runs of each system one at a time, interleaved."""
    start_seq = await next_result_seq(bed.ctl.jetstream())
    d_runs: list[str] = []
    n_runs: list[str] = []
    acked: dict[str, float] = {}
    for i in range(k):
        for system in ("dispatcher", "naive") if i % 2 == 0 else ("naive", "dispatcher"):
            if system == "dispatcher":
                runs, _, _ = await dispatcher_batch(bed, 1, 1, i, RESULT_TIMEOUT)
                d_runs += runs
            else:
                runs, _ = await naive_batch(bed, 1, 1, f"lat{i}", acked)
                n_runs += runs
    return (
        await dispatcher_samples(bed, d_runs, start_seq),
        await naive_samples(bed, n_runs, acked, start_seq),
    )


async def paced_round(
    bed: Bed, system: str, rate: float, seconds: float, tag: str
) -> tuple[dict[str, Any], Samples]:
    """Runs started at a steady ``rate`` per second for ``seconds`` (each run on its own,
    not waiting for the others): latency under a load both systems can carry."""
    n = max(1, round(rate * seconds))
    loop = asyncio.get_running_loop()
    start_seq = await next_result_seq(bed.ctl.jetstream())
    acked: dict[str, float] = {}
    runs: list[str] = []
    fut = await bed.expect(n) if system == "dispatcher" else None

    async def one(i: int) -> None:
        if system == "dispatcher":
            reply = await bed.client.submit_run(NS, WORKFLOW, run_input(i), timeout=30)
            assert reply.run is not None
            runs.append(reply.run)
        else:
            runs.append(f"{tag}x{i}")
            await naive_run(bed.client, f"{tag}x{i}", i, acked)

    started: list[asyncio.Future[None]] = []
    with CpuMeter(bed) as cpu:
        t0 = loop.time()
        for i in range(n):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            started.append(asyncio.ensure_future(one(i)))
        behind = loop.time() - (t0 + (n - 1) / rate)
        await bed.wait(asyncio.gather(*started), f"{system} at {rate:g} runs/s", 120 + seconds)
        if fut is not None:
            done = await bed.wait(fut, f"{system} at {rate:g} runs/s", 120)
            if done["failed"]:
                raise PhaseError(f"dispatcher: {done['failed']} runs failed")
    bed.check_alive()
    if system == "dispatcher":
        samples = await dispatcher_samples(bed, runs, start_seq)
    else:
        samples = await naive_samples(bed, runs, acked, start_seq)
    record: dict[str, Any] = {
        "runs": n,
        "last_start_behind_seconds": behind,
        "cpu_ms_per_run": cpu.per_run_ms(n),
        "latency": samples.summary(),
    }
    log(
        f"    {system}: dispatch p50 {record['latency']['dispatch']['p50_ms']:.2f} ms "
        f"p99 {record['latency']['dispatch']['p99_ms']:.2f} ms"
    )
    return record, samples


async def throughput_round(
    bed: Bed, system: str, n: int, concurrency: int, r: int
) -> tuple[dict[str, Any], Samples]:
    limit = 120 + n / 20
    start_seq = await next_result_seq(bed.ctl.jetstream())
    acked: dict[str, float] = {}
    with CpuMeter(bed) as cpu:
        if system == "dispatcher":
            runs, elapsed, submitted = await dispatcher_batch(bed, n, concurrency, 0, limit)
        else:
            runs, elapsed = await asyncio.wait_for(
                naive_batch(bed, n, concurrency, f"t{r}", acked), limit
            )
            submitted = float("nan")
    bed.check_alive()
    if system == "dispatcher":
        samples = await dispatcher_samples(bed, runs, start_seq)
    else:
        samples = await naive_samples(bed, runs, acked, start_seq)
    record: dict[str, Any] = {
        "runs_per_second": n / elapsed,
        "elapsed_seconds": elapsed,
        "cpu_ms_per_run": cpu.per_run_ms(n),
        **({"submit_seconds": submitted} if system == "dispatcher" else {}),
        "latency": samples.summary(),
    }
    log(
        f"    {system}: {n / elapsed:,.0f} runs/s, dispatch p50 "
        f"{record['latency']['dispatch']['p50_ms']:.2f} ms p99 "
        f"{record['latency']['dispatch']['p99_ms']:.2f} ms"
    )
    return record, samples


async def profile_rounds(bed: Bed, args: argparse.Namespace) -> None:
    """Two more dispatcher rounds under cProfile (in the dispatcher's process): a
    saturated one (to ``args.profile``) and a paced one (to ``<args.profile>.paced``)."""
    path: Path = args.profile
    paced = path.with_name(path.name + ".paced")
    rounds: list[tuple[Path, Callable[[], Awaitable[Any]]]] = [
        (path, lambda: dispatcher_batch(bed, args.runs, args.submit_concurrency, 0, 600)),
        (paced, lambda: paced_round(bed, "dispatcher", args.rate, args.paced_seconds, "prof")),
    ]
    for out, run in rounds:
        log(f"  profile: one more dispatcher round under cProfile -> {out}")
        await bed.request("profile", {"on": True})
        try:
            await run()
        finally:
            await bed.request("profile", {"on": False, "path": str(out)})
        await bed.dump()
        stats = pstats.Stats(str(out), stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    server, url = start_nats(tmp)
    with stopping([server]) as procs:
        await wait_port(url, server)
        configs = await declare_agents(url)
        runtimes: list[Proc] = []
        for agent, config in configs.items():
            runtimes.append(start_runtime(url, agent, config, tmp))
            procs.append(runtimes[-1])
        argv = [sys.executable, str(Path(__file__).resolve()), "--dispatcher", url]
        argv += ["--max-concurrent-runs", str(args.max_concurrent_runs)]
        disp = Proc.start("dispatcher", argv, tmp, {**os.environ, "PYTHONPATH": str(REPO)})
        procs.append(disp)
        client = await ShoalClient.connect(url)
        ctl = await nats.connect(url, name="bench-ctl")
        bed = Bed(url, tmp, server, disp, runtimes, client, ctl)
        try:
            await ctl.subscribe(f"{CTL}.done", cb=bed.on_done)
            await ctl.flush()
            await warm_up(bed, args.warmup, args.submit_concurrency)

            log(f"  latency: {args.latency_runs} runs one at a time per system, interleaved")
            d_lat, n_lat = await latency_phase(bed, args.latency_runs)

            paced: dict[str, list[dict[str, Any]]] = {"dispatcher": [], "naive": []}
            steady = {"dispatcher": Samples(), "naive": Samples()}
            for r in range(args.rounds):
                order = ("dispatcher", "naive") if r % 2 == 0 else ("naive", "dispatcher")
                for system in order:
                    log(
                        f"  paced round {r + 1}/{args.rounds}: {system}, {args.rate:g} runs/s "
                        f"for {args.paced_seconds:g}s"
                    )
                    record, samples = await paced_round(
                        bed, system, args.rate, args.paced_seconds, f"p{r}"
                    )
                    paced[system].append(record)
                    steady[system].extend(samples)

            rounds: dict[str, list[dict[str, Any]]] = {"dispatcher": [], "naive": []}
            loaded = {"dispatcher": Samples(), "naive": Samples()}
            for r in range(args.rounds):
                order = ("dispatcher", "naive") if r % 2 == 0 else ("naive", "dispatcher")
                for system in order:
                    log(f"  throughput round {r + 1}/{args.rounds}: {system}, {args.runs:,} runs")
                    record, samples = await throughput_round(
                        bed, system, args.runs, args.submit_concurrency, r
                    )
                    rounds[system].append(record)
                    loaded[system].extend(samples)
            if args.profile is not None:
                await profile_rounds(bed, args)
            rss = peak_rss_mib(disp.proc.pid)
        finally:
            await client.close()
            await ctl.close()
    out: dict[str, Any] = {}
    for system, lat in (("dispatcher", d_lat), ("naive", n_lat)):
        by_rate = sorted(rounds[system], key=lambda x: float(x["runs_per_second"]))
        median = by_rate[(len(by_rate) - 1) // 2]
        out[system] = {
            "runs_per_second": median["runs_per_second"],
            "cpu_ms_per_run": median["cpu_ms_per_run"],
            "rounds": rounds[system],
            "paced_cpu_ms_per_run": {
                k: statistics.median(float(x["cpu_ms_per_run"][k]) for x in paced[system])
                for k in paced[system][0]["cpu_ms_per_run"]
            },
            "paced_rounds": paced[system],
            "latency_one_at_a_time": lat.summary(),
            "latency_paced": steady[system].summary(),
            "latency_saturated": loaded[system].summary(),
        }
    out["dispatcher"]["peak_rss_mib"] = rss
    return out


def peak_rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- report -------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from shoal_testbed.binaries import nats_server_bin

    out = {"python": platform.python_version()}
    for dist in ("shoal", "nats-py", "pydantic"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    with contextlib.suppress(Exception):
        out["nats-server"] = subprocess.run(
            [str(nats_server_bin()), "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return out


LOADS = (
    ("one run at a time", "latency_one_at_a_time"),
    ("paced", "latency_paced"),
    ("saturated", "latency_saturated"),
)


def load_label(doc: dict[str, Any], key: str) -> str:
    return {
        "latency_one_at_a_time": "one run at a time",
        "latency_paced": f"at {doc['paced_rate']:g} runs/s",
        "latency_saturated": "saturated (throughput rounds)",
    }[key]


def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The latency goals, below saturation (beyond it, latency is queueing)."""
    out = []
    for _, key in LOADS[:2]:
        lat = doc["systems"]["dispatcher"][key].get("dispatch", {})
        for q, target in (("p50", GOAL_P50_MS), ("p99", GOAL_P99_MS)):
            value = lat.get(f"{q}_ms")
            out.append(
                {
                    "goal": f"dispatch {q}, {load_label(doc, key)}",
                    "value": value,
                    "target": target,
                    "met": None if value is None else value <= target,
                }
            )
    return out


def pair(lat: dict[str, Any], name: str) -> str:
    if name not in lat:
        return "-"
    return f"{lat[name]['p50_ms']:.2f} / {lat[name]['p99_ms']:.2f}"


LABELS = {
    "dispatcher": "Shoal dispatcher",
    "naive": "baseline: sequential client (`run_task` per step)",
}


def markdown(doc: dict[str, Any]) -> str:
    res = doc["systems"]
    base = res["naive"]["runs_per_second"]
    rate = f"{doc['paced_rate']:g}"
    out = [
        "The diamond DAG (authenticate -> classify || compliance -> answer, no-op handlers, "
        f"four runtime processes at concurrency {CONCURRENCY}), both systems on the same "
        f"runtimes in one invocation, {doc['cores']} cores (1-minute load average "
        f"{doc['load_average_1m']['start']} at the start, {doc['load_average_1m']['end']} at "
        f"the end). Throughput: {doc['runs']:,} runs per round, {doc['submit_concurrency']} "
        f"concurrent submitters (the baseline: {doc['submit_concurrency']} runs in flight), "
        f"median of {doc['rounds']} alternated rounds. Latency: {doc['latency_runs']} runs "
        f"one at a time per system (interleaved); {doc['rounds']} alternated rounds per "
        f"system of runs started at a steady {rate} runs/s for {doc['paced_seconds']:g} s; "
        "and the throughput rounds.",
        "",
        "| system | runs/s | vs baseline | dispatch p50 / p99 (ms), one run at a time "
        f"| dispatch p50 / p99 (ms), at {rate} runs/s | dispatch p50 / p99 (ms), saturated |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in ("dispatcher", "naive"):
        r = res[key]
        out.append(
            f"| {LABELS[key]} | {r['runs_per_second']:,.0f} | "
            f"{r['runs_per_second'] / base:.2f}x "
            + "".join(f"| {pair(r[k], 'dispatch')} " for _, k in LOADS)
            + "|"
        )

    def cpu(c: dict[str, float]) -> str:
        return " / ".join(f"{c[k]:.2f}" for k in ("dispatcher", "runtimes", "server", "client"))

    out += [
        "",
        f"| CPU per run (ms): dispatcher / runtimes / nats-server / client | at {rate} runs/s "
        "| saturated |",
        "| --- | --- | --- |",
    ]
    for key in ("dispatcher", "naive"):
        r = res[key]
        out.append(
            f"| {LABELS[key]} | {cpu(r['paced_cpu_ms_per_run'])} | {cpu(r['cpu_ms_per_run'])} |"
        )
    d, n = res["dispatcher"], res["naive"]
    submit = statistics.median(float(x["submit_seconds"]) for x in d["rounds"])
    elapsed = statistics.median(float(x["elapsed_seconds"]) for x in d["rounds"])
    why = (
        "its throughput is the rate at which it answers submissions"
        if submit >= 0.9 * elapsed
        else "the rest is the backlog of runs taken in, worked off"
    )
    out += [
        "",
        f"Submitting the {doc['runs']:,} runs took {submit:.1f} s of the dispatcher's "
        f"{elapsed:.1f} s (medians): {why}.",
        "",
        "Where the time goes, p50 / p99 (ms):",
        "",
        "| measure | "
        + " | ".join(f"Shoal, {load_label(doc, k)}" for _, k in LOADS)
        + " | "
        + " | ".join(f"baseline, {load_label(doc, k)}" for _, k in LOADS)
        + " |",
        "| --- " * 7 + "|",
    ]
    rows = (
        ("result stored -> arrival at the dispatcher", "delivery"),
        ("dispatcher's own `dispatch_latency` (arrival -> tasks acked + run stored)", "own"),
        ("**result stored -> next task stored (dispatch)**", "dispatch"),
        ("result stored -> next task taken up by its runtime (hand-off)", "handoff"),
    )
    for label, name in rows:
        out.append(
            f"| {label} "
            + "".join(f"| {pair(d[k], name)} " for _, k in LOADS)
            + "".join(f"| {pair(n[k], name)} " for _, k in LOADS)
            + "|"
        )
    slots = doc["max_concurrent_runs"]
    admission = (
        f"The Workflow's `maxConcurrentRuns` is {slots:,}: the dispatcher starts runs as "
        "fast as they are submitted, so each step waits behind the work of every run "
        "started."
        if slots >= doc["runs"]
        else f"The Workflow's `maxConcurrentRuns` is {slots:,} (`--max-concurrent-runs`): "
        "up to that many runs are started at once, each step waiting behind their work; "
        "the others wait Pending for a slot."
    )
    out += ["", "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    for g in doc["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:.2f} ms"
        met = {True: "met", False: "not met", None: "not measured"}[g["met"]]
        out.append(f"| {g['goal']} | <= {g['target']:g} ms | {value} | {met} |")
    out += [
        "",
        "Method:",
        "",
        "- Dispatch latency: for each step that waits on others, from the JetStream "
        "timestamp of the (last) result it waited for in SHOAL_RESULTS to its own task "
        "being stored in SHOAL_TASKS, i.e. its publish acknowledgement reaching the "
        "publisher (SHOAL_TASKS is a work queue: consumed tasks are deleted, so their "
        "stream timestamps cannot be read back). The dispatcher's sample is taken when the "
        "acknowledgements of all the tasks one result led to are in (classify and compliance "
        "are published together); the baseline's when its client has the acknowledgement. "
        "Everything runs on one host: the server's timestamps and the processes' wall "
        "clocks are the same clock. Samples per run: 2 for the dispatcher (authenticate -> "
        "classify + compliance; the later of those -> answer), 3 for the baseline.",
        "- Hand-off: from the same result to the next step's task being taken up by its "
        "runtime (the result's `started`): what a run waits between two steps. It can be "
        "shorter than dispatch: the runtime may have the task before the publisher has "
        "the acknowledgement.",
        "- The dispatcher's own `dispatch_latency` runs from a result's arrival at its "
        "callback to the dependents' tasks acknowledged *and* the run's record stored in KV "
        "(compare-and-set), so it can be longer than the end-to-end figure.",
        f"- Loads: one run at a time (the next starts when the last finished); {rate} runs "
        "started per second, each on its own (below both systems' capacity); saturated: "
        "the throughput rounds, where latency is mostly queueing (the goals apply below "
        f"saturation). {admission}",
        "- Throughput: from the first submission to the last run finished: for the "
        "dispatcher its storing the last terminal run record (N runs submitted by "
        f"{doc['submit_concurrency']} concurrent `ShoalClient.submit_run` callers), for "
        "the baseline its client receiving the last step's "
        f"result ({doc['submit_concurrency']} runs in flight, each step through "
        "`ShoalClient.run_task`'s own calls: an ordered consumer on the result subject, the "
        "publish, the wait). Rounds alternate between the systems; the median is shown, "
        "every round is in workflow.json.",
        "- Processes: nats-server, the dispatcher (the operator's `Dispatcher` with a static "
        "catalog, log level WARNING; a subclass notes a result's arrival and its tasks' "
        "acknowledgement for this benchmark), four `python -m shoal_runtime` (auth, triage, "
        "compliance, support; `bench.noop_handler:handle`) and this benchmark's client, all "
        "on the same cores. The dispatcher also runs during the baseline's rounds and "
        "consumes its results (as in a cluster, where it reads every result).",
        "- SHOAL_RESULTS gets `max_consumers` 100,000 for this benchmark: nats-server 2.15 "
        "caps a stream at 1,000 consumers unless it sets a limit, and the baseline's "
        "`run_task` leaves an ordered consumer per task for 5 s (it fails at 200 runs in "
        "flight otherwise).",
        "- CPU per run: user + system CPU of each process during the timed section, divided "
        "by the runs.",
    ]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=2_000, help="runs per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per system")
    parser.add_argument("--latency-runs", type=int, default=200, help="one-at-a-time runs")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up runs per system")
    parser.add_argument("--submit-concurrency", type=int, default=200)
    parser.add_argument(
        "--rate", type=float, default=100, help="runs/s of the paced latency rounds"
    )
    parser.add_argument("--paced-seconds", type=float, default=8, help="length of a paced round")
    parser.add_argument(
        "--max-concurrent-runs",
        type=int,
        default=WorkflowSpec.model_fields["max_concurrent_runs"].default,
        help="the Workflow's maxConcurrentRuns (default: the CRD's default)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 runs x 1 round")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="cProfile two extra dispatcher rounds (saturated, paced) to FILE, FILE.paced",
    )
    parser.add_argument("--dispatcher", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    DIAMOND["maxConcurrentRuns"] = args.max_concurrent_runs
    if args.dispatcher:
        asyncio.run(dispatcher_process(args.dispatcher))
        return 0
    results_meta.start()
    if args.quick:
        args.runs, args.rounds, args.latency_runs, args.warmup = 300, 1, 50, 50
        args.paced_seconds = 3
    elif args.out is None:
        args.out = REPO / "bench" / "results"

    t_start = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
    log(
        f"workflow dispatch: {args.runs:,} runs x {args.rounds} rounds per system, "
        f"{args.latency_runs} latency runs, warm-up {args.warmup}"
    )
    with tempfile.TemporaryDirectory(prefix="shoal-bench-workflow-") as tmp:
        try:
            systems = asyncio.run(measure(args, Path(tmp)))
        except PhaseError as exc:
            log(f"ERROR: not measured: {exc}")
            return 1
    doc: dict[str, Any] = results_meta.stamp_json(
        {
            "runs": args.runs,
            "rounds": args.rounds,
            "latency_runs": args.latency_runs,
            "warmup": args.warmup,
            "submit_concurrency": args.submit_concurrency,
            "max_concurrent_runs": args.max_concurrent_runs,
            "paced_rate": args.rate,
            "paced_seconds": args.paced_seconds,
            "runtime_concurrency": CONCURRENCY,
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "versions": versions(),
            "wall_seconds": time.monotonic() - t_start,
            "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
            "systems": systems,
        }
    )
    doc["goals"] = goals(doc)
    table = results_meta.stamp_markdown(markdown(doc))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "workflow.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "workflow.md").write_text(table)
        log(f"wrote {args.out / 'workflow.json'} and {args.out / 'workflow.md'}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
