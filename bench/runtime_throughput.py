"""No-op tasks end to end: the Shoal runtime vs Celery 5 + Redis vs a bare nats-py loop.

All three systems run in one invocation, each on its own fresh server (nats-server with
JetStream in a temp dir, or redis-server without persistence, on a free loopback port),
so the ratios compare like with like on a noisy machine. Each system gets:

1. a readiness probe (one task through, end to end), then a warm-up burst;
2. latency: tasks sent one at a time, each waiting for its result; the time from just
   before publishing to the result's arrival at the client (p50/p99);
3. throughput: N tasks published as fast as the client can, timed from the first publish
   to the arrival of the N-th distinct result at the client.

Bare nats-py and Shoal run side by side: latency samples interleaved one by one and
throughput rounds alternated (median reported), so noise hits both alike and the
difference (the runtime's overhead) survives a busy machine. Celery runs after them.

The systems:

- bare nats-py: the ceiling of a JetStream work queue in Python. A work-queue stream, a
  durable pull consumer (explicit ack), and one worker process looping
  ``fetch(256)`` -> core-publish a small result (captured by a results stream) -> ack.
- Celery 5 + Redis: ``celery worker --pool prefork --concurrency 2`` on a Redis broker
  with the Redis result backend; tasks sent with ``noop.delay(i)``. Results are counted
  from the backend's own pub/sub notice (``PUBLISH celery-task-meta-<id>``, sent in the
  same pipeline as the SET that stores the result), so the task is not changed and the
  backend is not polled. Also measured: the worker side alone (N tasks queued while the
  worker consumes nothing, timed from ``add_consumer`` to the last result).
- Shoal: one ``python -m shoal_runtime`` process, its streams, KV buckets and durable
  consumer declared the way the operator declares them, handler
  ``bench.noop_handler:handle`` at concurrency 256. Results are counted on a core
  subscription to ``shoal.result.bench.>`` (every record is also checked to be
  Succeeded with output == input).

Writes bench/results/runtime.json and bench/results/runtime.md (``--quick`` prints the
table only, unless ``--out`` is given). Exits non-zero when a system could not be
measured (e.g. the runtime does not start); goals not met are reported, not failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import redis
import results_meta
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

REPO = Path(__file__).resolve().parents[1]
NS = "bench"
AGENT = "noop"
CONCURRENCY = 256
PUBLISH_CHUNK = 1000
BARE_TASKS, BARE_RESULTS, BARE_DURABLE = "BARE_TASKS", "BARE_RESULTS", "bare"
BARE_TASK_SUBJECT = "bare.task"
CELERY_KEY_PREFIX = "celery-task-meta-"
READY_LIMIT = 60.0
LATENCY_LIMIT = 10.0

GOAL_TPS = 10_000
GOAL_X_CELERY = 10.0
GOAL_P99_OVERHEAD_MS = 5.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class PhaseError(RuntimeError):
    """A system could not be measured (it did not start, or lost or failed tasks)."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# --- processes -----------------------------------------------------------------------


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
        tmp.mkdir(parents=True, exist_ok=True)
        logf = tmp / f"{name}.log"
        with logf.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        return cls(name, proc, logf)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise PhaseError(
                f"{self.name} exited with code {self.proc.returncode}; its log ends:\n"
                + log_tail(self.logf)
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def running(p: Proc) -> Iterator[Proc]:
    try:
        yield p
    finally:
        p.stop()


def nats_server(tmp: Path) -> tuple[Proc, str]:
    from shoal_testbed.binaries import nats_server_bin

    port = free_port()
    argv = [str(nats_server_bin()), "-a", "127.0.0.1", "-p", str(port)]
    argv += ["-js", "-sd", str(tmp / "jetstream")]
    return Proc.start("nats-server", argv, tmp), f"nats://127.0.0.1:{port}"


async def connect_nats(url: str, server: Proc, name: str) -> Client:
    """Waits for the server's port (quietly), then connects."""
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
        return await nats.connect(url, name=name, connect_timeout=5)


def redis_server(tmp: Path, binary: str) -> tuple[Proc, str]:
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    # The Celery client subscribes to every task's result channel and reads them only in
    # AsyncResult.get(): no pub/sub output limit, so the throughput run cannot get it cut off.
    argv += ["no", "--dir", str(tmp), "--client-output-buffer-limit", "pubsub 0 0 0"]
    return Proc.start("redis-server", argv, tmp), f"redis://127.0.0.1:{port}/0"


def wait_redis(url: str, server: Proc) -> redis.Redis:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        server.check_alive()
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise PhaseError(f"redis-server at {url} never answered PING") from None
            time.sleep(0.1)


def cpu_seconds(root: int) -> float:
    """User + system CPU of a process and its descendants (Celery's pool children)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU spent during a timed section by the worker (process tree), the server and this
    client process (publisher and result collector), per task."""

    def __init__(self, worker: Proc, server: Proc) -> None:
        self.pids = {"worker": worker.proc.pid, "server": server.proc.pid}
        self.start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {k: cpu_seconds(pid) for k, pid in self.pids.items()}
        now["client"] = time.process_time()
        return now

    def __enter__(self) -> CpuMeter:
        self.start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._now()

    def per_task_ms(self, n: int) -> dict[str, float]:
        return {
            f"{k}_cpu_ms_per_task": 1000 * (self.end[k] - self.start[k]) / n for k in self.start
        }


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the two NATS systems, run side by side ------------------------------------------


def task_index(task_id: str) -> int:
    """Task ids are ``<tag>-<i>``; every task's input (and so its output) is ``{"i": i}``."""
    return int(task_id.rsplit("-", 1)[1])


class Collector:
    """Counts distinct results by the last subject token (the task id) and resolves the
    latency run's waiters; bodies are kept for checking after the timed section."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.bodies: list[bytes] = []
        self.last = 0.0
        self.target = 0
        self.done = asyncio.Event()
        self.waiters: dict[str, asyncio.Future[float]] = {}

    def expect(self, n: int) -> None:
        self.ids, self.bodies, self.last, self.target = set(), [], 0.0, n
        self.done.clear()

    async def on_msg(self, msg: Msg) -> None:
        now = time.perf_counter()
        key = msg.subject.rsplit(".", 1)[1]
        waiter = self.waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)
        if key not in self.ids:
            self.ids.add(key)
            self.bodies.append(msg.data)
            self.last = now
            if len(self.ids) >= self.target > 0:
                self.done.set()


Message = tuple[str, bytes, dict[str, str] | None]


@dataclass
class NatsSystem:
    """A NATS-based system under test: its server, its worker and the client side."""

    key: str
    label: str
    url: str
    server: Proc
    worker: Proc
    results_subject: str
    make: Callable[[str, int], Message]
    """The task message with id ``<tag>-<i>`` and input ``{"i": i}``."""
    check: Callable[[list[bytes]], dict[str, Any]]
    """Checks result bodies; raises PhaseError on a bad one."""
    stack: contextlib.AsyncExitStack
    """Stops this system's connections and processes (LIFO)."""
    col: Collector = field(default_factory=Collector)
    js: JetStreamContext | None = None
    latencies: list[float] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def publisher(self) -> JetStreamContext:
        assert self.js is not None
        return self.js


async def publish_all(js: JetStreamContext, messages: list[Message]) -> None:
    for k in range(0, len(messages), PUBLISH_CHUNK):
        await asyncio.gather(
            *(js.publish(s, b, headers=h) for s, b, h in messages[k : k + PUBLISH_CHUNK])
        )


async def wait_done(sys_: NatsSystem, what: str, started: float, limit: float) -> None:
    col = sys_.col
    while not col.done.is_set():
        try:
            await asyncio.wait_for(col.done.wait(), 2)
        except TimeoutError:
            sys_.worker.check_alive()
            elapsed = time.perf_counter() - started
            log(f"    {what}: {len(col.ids)}/{col.target} results after {elapsed:.1f}s")
            if elapsed > limit:
                raise PhaseError(
                    f"{what}: only {len(col.ids)}/{col.target} results after {limit:.0f}s"
                ) from None


async def open_system(sys_: NatsSystem, warm: int) -> None:
    """Connects the client side, then a readiness probe and a warm-up burst."""
    sub_nc = await nats.connect(sys_.url, name="bench-results")
    sys_.stack.push_async_callback(sub_nc.drain)
    pub_nc = await nats.connect(sys_.url, name="bench-publisher")
    sys_.stack.push_async_callback(pub_nc.drain)
    sys_.js = pub_nc.jetstream()
    await sub_nc.subscribe(
        sys_.results_subject,
        cb=sys_.col.on_msg,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    await sub_nc.flush()
    log(f"  {sys_.label}: readiness probe (one task end to end, up to {READY_LIMIT:.0f}s)")
    sys_.col.expect(1)
    started = time.perf_counter()
    await publish_all(sys_.js, [sys_.make("r-0", 0)])
    await wait_done(sys_, "readiness probe", started, READY_LIMIT)
    sys_.check(sys_.col.bodies)
    log(f"  {sys_.label}: ready after {time.perf_counter() - started:.2f}s; warm-up {warm}")
    sys_.col.expect(warm)
    started = time.perf_counter()
    await publish_all(sys_.js, [sys_.make(f"w-{i}", i) for i in range(warm)])
    await wait_done(sys_, "warm-up", started, READY_LIMIT)
    sys_.check(sys_.col.bodies)
    sys_.col.expect(0)


async def latency_sample(sys_: NatsSystem, i: int) -> None:
    subject, body, headers = sys_.make(f"l-{i}", i)
    fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    sys_.col.waiters[f"l-{i}"] = fut
    t0 = time.perf_counter()
    await sys_.publisher().publish(subject, body, headers=headers)
    try:
        sys_.latencies.append(await asyncio.wait_for(fut, LATENCY_LIMIT) - t0)
    except TimeoutError:
        sys_.worker.check_alive()
        raise PhaseError(f"latency task l-{i}: no result in {LATENCY_LIMIT:.0f}s") from None


async def throughput_round(sys_: NatsSystem, n: int, tag: str) -> None:
    messages = [sys_.make(f"{tag}-{i}", i) for i in range(n)]
    sys_.col.expect(n)
    with CpuMeter(sys_.worker, sys_.server) as cpu:
        started = time.perf_counter()
        await publish_all(sys_.publisher(), messages)
        published = time.perf_counter() - started
        await wait_done(sys_, "throughput", started, 60 + n / 200)
    elapsed = sys_.col.last - started
    checked = sys_.check(sys_.col.bodies)
    sys_.worker.check_alive()
    log(f"    {sys_.label}: {n / elapsed:,.0f} tasks/s (published in {published:.2f}s)")
    sys_.rounds.append(
        {
            "tasks_per_second": n / elapsed,
            "elapsed_seconds": elapsed,
            "publish_seconds": published,
            **cpu.per_task_ms(n),
            **checked,
        }
    )


def summary(sys_: NatsSystem) -> dict[str, Any]:
    """The median throughput round (with its CPU figures), every round's rate, latency."""
    by_rate = sorted(sys_.rounds, key=lambda r: float(r["tasks_per_second"]))
    lat = sys_.latencies
    return {
        **by_rate[(len(by_rate) - 1) // 2],
        "rounds_tasks_per_second": [r["tasks_per_second"] for r in sys_.rounds],
        "latency_p50_ms": 1000 * statistics.median(lat),
        "latency_p99_ms": 1000 * percentile(lat, 0.99),
        "latency_max_ms": 1000 * max(lat),
    }


async def bare_worker(url: str) -> None:
    """The bare loop, run as its own process (``--bare-worker URL``)."""
    nc = await nats.connect(url, name="bench-bare-worker")
    js = nc.jetstream()
    psub = await js.pull_subscribe(BARE_TASK_SUBJECT, durable=BARE_DURABLE, stream=BARE_TASKS)
    while True:
        try:
            msgs = await psub.fetch(256, timeout=5)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            task = json.loads(msg.data)
            body = {"id": task["id"], "output": task["input"]}
            await nc.publish(f"bare.result.{task['id']}", json.dumps(body).encode())
            await msg.ack()


def check_bare(bodies: list[bytes]) -> dict[str, Any]:
    for raw in bodies:
        body = json.loads(raw)
        if body["output"] != {"i": task_index(body["id"])}:
            raise PhaseError(f"bare: wrong output {body}")
    return {}


async def start_bare(stack: contextlib.AsyncExitStack, tmp: Path) -> NatsSystem:
    server, url = nats_server(tmp)
    stack.callback(server.stop)
    nc = await connect_nats(url, server, "bench-admin")
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=BARE_TASKS,
            subjects=[BARE_TASK_SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    await js.add_stream(
        StreamConfig(name=BARE_RESULTS, subjects=["bare.result.>"], storage=StorageType.FILE)
    )
    await js.add_consumer(
        BARE_TASKS,
        ConsumerConfig(
            durable_name=BARE_DURABLE, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1024
        ),
    )
    await nc.drain()

    def make(task_id: str, i: int) -> Message:
        body = json.dumps({"id": task_id, "input": {"i": i}}).encode()
        return BARE_TASK_SUBJECT, body, None

    argv = [sys.executable, str(Path(__file__).resolve()), "--bare-worker", url]
    worker = Proc.start("bare-worker", argv, tmp)
    stack.callback(worker.stop)
    return NatsSystem(
        "bare", "bare nats-py", url, server, worker, "bare.result.>", make, check_bare, stack
    )


def check_shoal(bodies: list[bytes]) -> dict[str, Any]:
    from shoal_api.envelope import Result

    spans = []
    for raw in bodies:
        result = Result.model_validate_json(raw)
        if result.status != "Succeeded":
            raise PhaseError(f"shoal: task {result.id} {result.status}: {result.message}")
        if result.output != {"i": task_index(result.id)}:
            raise PhaseError(f"shoal: task {result.id} output {result.output!r} != its input")
        if result.started is not None:
            spans.append(result.finished - result.started)
    if not spans:
        return {}
    return {
        "reported_span_p50_ms": 1000 * statistics.median(spans),
        "reported_span_p99_ms": 1000 * percentile(spans, 0.99),
    }


async def start_shoal(stack: contextlib.AsyncExitStack, tmp: Path) -> NatsSystem:
    from shoal_api import nats_layout
    from shoal_api.agent import AgentSpec
    from shoal_api.envelope import Task
    from shoal_api.pod_contract import CONFIG_ENV
    from shoal_operator.builders import jetstream
    from shoal_operator.builders.common import Owner
    from shoal_operator.builders.deployment import runtime_config
    from shoal_operator.clients.jetstream import JetStreamAdmin

    main = REPO / "agent-runtime" / "shoal_runtime" / "__main__.py"
    if not main.exists():
        raise PhaseError(f"the runtime is not there yet: {main.relative_to(REPO)} is missing")
    server, url = nats_server(tmp)
    stack.callback(server.stop)
    await (await connect_nats(url, server, "bench-probe")).close()
    spec = AgentSpec.model_validate(
        {"handler": {"python": "bench.noop_handler:handle"}, "concurrency": CONCURRENCY}
    )
    admin = await JetStreamAdmin.connect(url)
    try:
        await admin.ensure_streams()
        await admin.ensure_buckets()
        await admin.ensure_consumers(jetstream.consumers(NS, AGENT, spec, 1))
    finally:
        await admin.close()
    owner = Owner("Agent", NS, AGENT, "00000000-0000-0000-0000-000000000000")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path[1:]]),
        "SHOAL_NATS_URL": url,
        "SHOAL_NAMESPACE": NS,
        "SHOAL_AGENT": AGENT,
        "SHOAL_POD_NAME": f"{AGENT}-0",
        "SHOAL_HEALTH_PORT": str(free_port()),
        "SHOAL_METRICS_PORT": str(free_port()),
        CONFIG_ENV: runtime_config(owner, spec),
    }
    subject = nats_layout.task_subject(NS, AGENT, 5)

    def make(task_id: str, i: int) -> Message:
        task = Task(id=task_id, input={"i": i})
        return subject, task.to_json(), {"Nats-Msg-Id": task.msg_id()}

    worker = Proc.start("shoal-runtime", [sys.executable, "-m", "shoal_runtime"], tmp, env)
    stack.callback(worker.stop)
    results = nats_layout.result_subject(NS, ">")
    return NatsSystem("shoal", "Shoal", url, server, worker, results, make, check_shoal, stack)


STARTERS = {"bare": start_bare, "shoal": start_shoal}


async def phase_nats(
    tmp: Path, keys: list[str], n: int, samples: int, warm: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """bare nats-py and Shoal side by side: latency samples interleaved one by one,
    throughput rounds alternated, so that noise on the machine hits both alike."""
    out: dict[str, dict[str, Any]] = {}
    live: list[NatsSystem] = []

    async def fail(sys_: NatsSystem, exc: PhaseError) -> None:
        log(f"ERROR: {sys_.label} not measured: {exc}")
        out[sys_.key] = {"error": str(exc)}
        live.remove(sys_)
        await sys_.stack.aclose()

    async with contextlib.AsyncExitStack() as outer:
        for key in keys:
            stack = await outer.enter_async_context(contextlib.AsyncExitStack())
            log(f"  starting {key}")
            try:
                sys_ = await STARTERS[key](stack, tmp / key)
            except PhaseError as exc:
                log(f"ERROR: {key} not measured: {exc}")
                out[key] = {"error": str(exc)}
                await stack.aclose()
                continue
            live.append(sys_)
            try:
                await open_system(sys_, warm)
            except PhaseError as exc:
                await fail(sys_, exc)

        names = " and ".join(s.label for s in live)
        log(f"  latency: {samples:,} tasks one at a time each, {names} interleaved")
        for i in range(samples):
            for sys_ in list(live if i % 2 == 0 else reversed(live)):
                try:
                    await latency_sample(sys_, i)
                except PhaseError as exc:
                    await fail(sys_, exc)
        for sys_ in list(live):
            try:
                sys_.check(sys_.col.bodies)
            except PhaseError as exc:
                await fail(sys_, exc)

        for r in range(rounds):
            for sys_ in list(live if r % 2 == 0 else reversed(live)):
                log(f"  throughput round {r + 1}/{rounds}: {sys_.label}, {n:,} tasks")
                try:
                    await throughput_round(sys_, n, f"t{r}")
                except PhaseError as exc:
                    await fail(sys_, exc)

        for sys_ in live:
            out[sys_.key] = summary(sys_)
            if sys_.key == "shoal":
                out[sys_.key]["concurrency"] = CONCURRENCY
                out[sys_.key]["runtime_peak_rss_mib"] = peak_rss_mib(sys_.worker.proc.pid)
    return out


# --- 2. Celery + Redis ---------------------------------------------------------------


class CeleryCounter:
    """Distinct ``celery-task-meta-<id>`` notices, on its own connection and thread."""

    def __init__(self, url: str) -> None:
        # Keep the client: when it is collected, its pool closes the pub/sub connection.
        self.client = redis.Redis.from_url(url)
        self.pubsub: redis.client.PubSub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(CELERY_KEY_PREFIX + "*")
        self.lock = threading.Lock()
        self.ids: set[str] = set()
        self.bodies: list[bytes] = []
        self.last = 0.0
        self.target = 0
        self.done = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def expect(self, n: int) -> None:
        with self.lock:
            self.ids, self.bodies, self.last, self.target = set(), [], 0.0, n
            self.done.clear()

    def _run(self) -> None:
        while not self.stopping:
            msg = self.pubsub.get_message(timeout=0.2)
            if msg is None or msg["type"] != "pmessage":
                continue
            now = time.perf_counter()
            key = msg["channel"][len(CELERY_KEY_PREFIX) :].decode()
            with self.lock:
                if key not in self.ids:
                    self.ids.add(key)
                    self.bodies.append(msg["data"])
                    self.last = now
                    if len(self.ids) >= self.target > 0:
                        self.done.set()

    def wait(self, what: str, started: float, limit: float, alive: Callable[[], None]) -> None:
        while not self.done.wait(2):
            alive()
            elapsed = time.perf_counter() - started
            log(f"    {what}: {len(self.ids)}/{self.target} results after {elapsed:.1f}s")
            if elapsed > limit:
                raise PhaseError(f"{what}: only {len(self.ids)}/{self.target} results")

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.pubsub.close()
        self.client.close()


def check_celery(bodies: list[bytes]) -> None:
    for raw in bodies:
        body = json.loads(raw)
        if body["status"] != "SUCCESS":
            raise PhaseError(f"celery: task failed: {body}")


def phase_celery(tmp: Path, redis_bin: str, n: int, samples: int, warm: int) -> dict[str, Any]:
    server, url = redis_server(tmp, redis_bin)
    with running(server):
        wait_redis(url, server).close()
        os.environ["BENCH_REDIS_URL"] = url
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        mod = importlib.import_module("bench.celery_noop")
        app, noop = mod.app, mod.noop
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path[1:]])}
        argv = [sys.executable, "-m", "celery", "-A", "bench.celery_noop", "worker"]
        argv += ["--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING"]
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        with running(Proc.start("celery-worker", argv, tmp, env)) as worker:
            log(f"  Celery: waiting for the worker (control.ping, up to {READY_LIMIT:.0f}s)")
            started = time.perf_counter()
            while not app.control.ping(timeout=0.5):
                worker.check_alive()
                if time.perf_counter() - started > READY_LIMIT:
                    raise PhaseError("celery worker never answered control.ping")
            log(f"  Celery: ready after {time.perf_counter() - started:.2f}s; warm-up {warm}")
            counter = CeleryCounter(url)
            try:
                pending = [noop.delay(i) for i in range(warm)]
                for r in pending:
                    r.get(timeout=READY_LIMIT)

                log(f"  Celery: latency, {samples} tasks one at a time")
                latencies: list[float] = []
                for i in range(samples):
                    t0 = time.perf_counter()
                    if noop.delay(i).get(timeout=LATENCY_LIMIT) != i:
                        raise PhaseError("celery: wrong result")
                    latencies.append(time.perf_counter() - t0)

                log(f"  Celery: throughput, {n} tasks")
                counter.expect(n)
                with CpuMeter(worker, server) as cpu:
                    started = time.perf_counter()
                    for i in range(n):
                        noop.delay(i)
                    published = time.perf_counter() - started
                    log(f"    published {n} in {published:.2f}s")
                    counter.wait("throughput", started, 60 + n / 50, worker.check_alive)
                elapsed = counter.last - started
                check_celery(counter.bodies)

                # Celery's synchronous client publishes slower than the NATS clients: the
                # same N once more, queued while the worker consumes nothing, then timed
                # from add_consumer to the last result: the worker side alone.
                log(f"  Celery: drain, {n} tasks queued first (worker side only)")
                app.control.cancel_consumer("celery", reply=True, timeout=5)
                counter.expect(n)
                for i in range(n):
                    noop.delay(i)
                started = time.perf_counter()
                app.control.add_consumer("celery", reply=True, timeout=5)
                counter.wait("drain", started, 60 + n / 50, worker.check_alive)
                drain = counter.last - started
                check_celery(counter.bodies)
                worker.check_alive()
            finally:
                counter.stop()
    return {
        "tasks_per_second": n / elapsed,
        "elapsed_seconds": elapsed,
        "publish_seconds": published,
        **cpu.per_task_ms(n),
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * percentile(latencies, 0.99),
        "latency_max_ms": 1000 * max(latencies),
        "drain_tasks_per_second": n / drain,
        "drain_seconds": drain,
    }


# --- report --------------------------------------------------------------------------


def versions(redis_bin: str | None) -> dict[str, str]:
    from shoal_testbed.binaries import nats_server_bin

    out = {"python": platform.python_version()}
    for dist in ("shoal", "nats-py", "celery", "kombu", "redis", "pydantic"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    with contextlib.suppress(Exception):
        out["nats-server"] = subprocess.run(
            [str(nats_server_bin()), "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    if redis_bin:
        with contextlib.suppress(Exception):
            out["redis-server"] = subprocess.run(
                [redis_bin, "--version"], capture_output=True, text=True, check=True
            ).stdout.split()[2]
    return out


SYSTEMS = (("bare", "bare nats-py"), ("celery", "Celery 5 + Redis"), ("shoal", "Shoal runtime"))


def goals(res: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    shoal, celery, bare = res.get("shoal", {}), res.get("celery", {}), res.get("bare", {})
    tps = shoal.get("tasks_per_second")
    x_celery = tps / celery["tasks_per_second"] if tps and "tasks_per_second" in celery else None
    over = None
    if "latency_p99_ms" in shoal and "latency_p99_ms" in bare:
        over = shoal["latency_p99_ms"] - bare["latency_p99_ms"]

    def goal(name: str, value: float | None, target: float, unit: str, le: bool) -> dict[str, Any]:
        met = None if value is None else (value <= target if le else value >= target)
        return {"goal": name, "value": value, "target": target, "unit": unit, "met": met}

    return [
        goal("Shoal throughput", tps, GOAL_TPS, "tasks/s", False),
        goal("Shoal vs Celery", x_celery, GOAL_X_CELERY, "x", False),
        goal("p99 overhead vs bare nats-py", over, GOAL_P99_OVERHEAD_MS, "ms", True),
    ]


def markdown(doc: dict[str, Any]) -> str:
    res: dict[str, dict[str, Any]] = doc["systems"]
    celery_tps = res.get("celery", {}).get("tasks_per_second")
    bare_tps = res.get("bare", {}).get("tasks_per_second")
    out = [
        f"No-op tasks end to end: {doc['tasks']:,} tasks per throughput run (bare nats-py "
        f"and Shoal: median of {doc['rounds']} alternated rounds), "
        f"{doc['latency_samples']:,} sequential tasks for latency, {doc['cores']} cores, "
        "all three systems measured in one invocation (ratios are within the run; "
        f"1-minute load average {doc['load_average_1m']['start']} at the start, "
        f"{doc['load_average_1m']['end']} at the end).",
        "",
        "| system | tasks/s | vs Celery | vs bare nats-py | latency p50 (ms) "
        "| latency p99 (ms) | publishing N (s) | CPU per task (ms): worker / server / client |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in SYSTEMS:
        r = res.get(key, {})
        if "tasks_per_second" not in r:
            why = (r.get("error") or "not run").splitlines()[0].split("; its log ends")[0]
            out.append(f"| {label} | not measured: {why} |  |  |  |  |  |  |")
            continue
        tps = r["tasks_per_second"]
        vs_c = f"{tps / celery_tps:.1f}x" if celery_tps else "-"
        vs_b = f"{tps / bare_tps:.2f}x" if bare_tps else "-"
        out.append(
            f"| {label} | {tps:,.0f} | {vs_c} | {vs_b} | {r['latency_p50_ms']:.2f} "
            f"| {r['latency_p99_ms']:.2f} | {r['publish_seconds']:.2f} "
            f"| {r['worker_cpu_ms_per_task']:.3f} / {r['server_cpu_ms_per_task']:.3f} "
            f"/ {r['client_cpu_ms_per_task']:.3f} |"
        )
    shoal, bare, celery = res.get("shoal", {}), res.get("bare", {}), res.get("celery", {})
    if "drain_tasks_per_second" in celery:
        drain = celery["drain_tasks_per_second"]
        vs = (
            f"; Shoal end to end is {shoal['tasks_per_second'] / drain:.1f}x that"
            if "tasks_per_second" in shoal
            else ""
        )
        out += [
            "",
            "Celery's client publishes one task per round trip, so its end-to-end figure "
            f"includes a slow publisher. Its worker side alone (N tasks queued first, timed "
            f"from add_consumer to the last result) drains {drain:,.0f} tasks/s{vs}.",
        ]
    if "latency_p50_ms" in shoal and "latency_p50_ms" in bare:
        out += [
            "",
            "Per-task overhead of the Shoal runtime (Shoal latency minus bare nats-py latency): "
            f"p50 {shoal['latency_p50_ms'] - bare['latency_p50_ms']:.2f} ms, "
            f"p99 {shoal['latency_p99_ms'] - bare['latency_p99_ms']:.2f} ms.",
        ]
    out += ["", "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    for g in doc["goals"]:
        op = "<=" if g["goal"].startswith("p99") else ">="
        value = "-" if g["value"] is None else f"{g['value']:,.2f} {g['unit']}"
        met = {True: "met", False: "not met", None: "not measured"}[g["met"]]
        out.append(f"| {g['goal']} | {op} {g['target']:,} {g['unit']} | {value} | {met} |")
    out += [
        "",
        "Method:",
        "",
        "- Each system first gets a readiness probe (one task end to end) and a warm-up "
        "burst. Bare nats-py and Shoal run side by side (each with its own nats-server) "
        "so that noise on the machine hits both alike: their latency samples are "
        "interleaved one by one and their throughput rounds alternate; Celery runs after.",
        "- Throughput: N tasks published as fast as one client can (JetStream publishes "
        f"awaited in concurrent chunks of {PUBLISH_CHUNK}; Celery `noop.delay(i)` in a loop), "
        "timed from the first publish to the arrival of the N-th distinct result at the "
        "client. For bare nats-py and Shoal the median round is shown (every round is in "
        "runtime.json).",
        "- Latency: tasks sent one at a time, each timed from just before publishing (the "
        "JetStream publish awaits its ack) to its result's arrival at the client (NATS: "
        "core subscription on the results subject; Celery: `AsyncResult.get()`). The "
        "handler is a no-op, so Shoal minus bare nats-py at p50 and p99 is the time the "
        "runtime adds per task (contract checks, result record published with a JetStream "
        "ack and a `Nats-Msg-Id`, metrics) over the bare loop (core-published result).",
        "- Bare nats-py: work-queue stream, durable pull consumer (explicit ack), one worker "
        "process looping `fetch(256)` -> core-publish a small result (stored by a results "
        "stream) -> `ack()`: the ceiling of a JetStream work queue in Python.",
        "- Celery 5 + Redis: `celery worker --pool prefork --concurrency 2 --without-gossip "
        "--without-mingle --without-heartbeat`, Redis broker and result backend, Celery's "
        "defaults otherwise (early ack, prefetch 4). Results are counted from the backend's "
        "own `PUBLISH celery-task-meta-<id>` (sent with the SET that stores the result).",
        f"- Shoal: one `python -m shoal_runtime` process, handler `bench.noop_handler:handle`, "
        f"concurrency {CONCURRENCY}; streams, buckets and the durable consumer declared "
        "the operator's way; every result checked to be Succeeded with output == input.",
        "- CPU per task, during the throughput run: user + system CPU of the worker "
        "process tree (the bare worker, the Celery worker and its pool, the Shoal runtime), "
        "of the server (nats-server, redis-server) and of the benchmark client (publisher "
        "and result collector). All of them share the same cores.",
    ]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per throughput run")
    parser.add_argument("--latency-samples", type=int, default=2_000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument(
        "--rounds", type=int, default=3, help="throughput rounds of bare nats-py and Shoal"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2,000 tasks x 2 rounds, 200 samples"
    )
    parser.add_argument("--only", default="bare,celery,shoal", help="comma-separated systems")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--bare-worker", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(bare_worker(args.bare_worker))
        return 0
    results_meta.start()
    if args.quick:
        args.tasks, args.latency_samples, args.warmup, args.rounds = 2_000, 200, 100, 2
    elif args.out is None:
        args.out = REPO / "bench" / "results"
    only = set(args.only.split(","))
    n, samples, warm = args.tasks, args.latency_samples, args.warmup

    redis_bin = None
    if "celery" in only:
        log("redis-server: hack/install-redis.sh")
        proc = subprocess.run(
            ["bash", str(REPO / "hack" / "install-redis.sh")], stdout=subprocess.PIPE, text=True
        )
        if proc.returncode != 0:
            log("ERROR: no redis-server for the Celery baseline (see above)")
            return 1
        redis_bin = proc.stdout.strip().splitlines()[-1]

    systems: dict[str, dict[str, Any]] = {}
    t_start = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-runtime-") as tmp_dir:
        tmp = Path(tmp_dir)
        nats_keys = [key for key, _ in SYSTEMS if key in only and key != "celery"]
        if nats_keys:
            names = " and ".join(label for key, label in SYSTEMS if key in nats_keys)
            log(
                f"{names}: {n:,} tasks x {args.rounds} rounds, {samples:,} latency samples, "
                f"warm-up {warm}"
            )
            load = round(os.getloadavg()[0], 2)
            started = time.monotonic()
            for key, r in asyncio.run(
                phase_nats(tmp, nats_keys, n, samples, warm, args.rounds)
            ).items():
                systems[key] = {**r, "load_average_before": load}
            log(f"  done in {time.monotonic() - started:.0f}s")
        if "celery" in only:
            assert redis_bin is not None
            log(f"Celery 5 + Redis: {n:,} tasks, {samples:,} latency samples, warm-up {warm}")
            load = round(os.getloadavg()[0], 2)
            started = time.monotonic()
            try:
                r = phase_celery(tmp / "celery", redis_bin, n, samples, warm)
                systems["celery"] = {**r, "load_average_before": load}
            except PhaseError as exc:
                log(f"ERROR: Celery not measured: {exc}")
                systems["celery"] = {"error": str(exc)}
            log(f"  done in {time.monotonic() - started:.0f}s")
    for key, label in SYSTEMS:
        r = systems.get(key, {})
        if "tasks_per_second" in r:
            log(
                f"{label}: {r['tasks_per_second']:,.0f} tasks/s, latency p50 "
                f"{r['latency_p50_ms']:.2f} ms p99 {r['latency_p99_ms']:.2f} ms"
            )
    doc: dict[str, Any] = results_meta.stamp_json(
        {
            "tasks": n,
            "rounds": args.rounds,
            "latency_samples": samples,
            "warmup": warm,
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "versions": versions(redis_bin),
            "wall_seconds": time.monotonic() - t_start,
            "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
            "systems": systems,
        }
    )
    doc["goals"] = goals(systems)
    table = results_meta.stamp_markdown(markdown(doc))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runtime.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "runtime.md").write_text(table)
        log(f"wrote {args.out / 'runtime.json'} and {args.out / 'runtime.md'}")
    print(table)
    failed = [key for key in only if "error" in systems.get(key, {"error": ""})]
    if failed:
        log(f"ERROR: not measured: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
