"""The JetStream side of a fleet alone: N Agents' band consumers on one nats-server.

A fresh nats-server (JetStream, file storage, a temp dir, a free loopback port) gets the
streams and buckets, then every Agent's durable consumers, declared with the operator's
own code (``JetStreamAdmin.ensure_consumers`` of ``builders.jetstream.consumers``, the
Agent reconcile's call) by ``--workers`` concurrent declarers, as the operator's
reconcile workers would. Measured:

- declaration time, total and per tenth of the fleet (the create cost grows with the
  consumers already on the work-queue stream), and per Agent;
- a re-declaration of a sample of Agents (what an operator restart costs per Agent:
  a consumer lookup, no create);
- nats-server memory (VmRSS, VmHWM) before and after, per consumer and per Agent;
- nats-server CPU per second while idle afterwards;
- how long nats-server takes to stop (SIGTERM to exit; killed after ``--stop-limit``).

Writes bench/results/jetstream.json and .md (with the git commit and UTC date);
``--agents 50`` makes a smoke run. SIGTERM and Ctrl-C stop the nats-server too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import results_meta

from shoal_api import nats_layout as nl
from shoal_api.agent import AgentSpec
from shoal_operator.builders import jetstream
from shoal_operator.clients.jetstream import JetStreamAdmin
from shoal_testbed.binaries import nats_server_bin

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
NS = "bench"
SPEC = AgentSpec.model_validate({"handler": {"python": "bench.noop_handler:handle"}})
IDLE_SECONDS = 10.0
RESAMPLE = 200


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_name(i: int) -> str:
    return f"agent-{i:05d}"


class Server:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(nats_server_bin()),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nats-server did not listen in time") from None
                await asyncio.sleep(0.05)

    def stop(self, limit: float) -> float | None:
        """Seconds from SIGTERM to exit; None when it had to be killed after ``limit``."""
        if self.proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(limit)
            return time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            return None


async def declare(admin: JetStreamAdmin, agents: int, workers: int) -> dict[str, Any]:
    """Every Agent's consumers; the time at each tenth of the fleet."""
    todo = iter(range(agents))
    failures: list[str] = []
    done = 0
    marks: list[dict[str, float]] = []
    step = max(1, agents // 10)
    started = time.monotonic()

    async def worker() -> None:
        nonlocal done
        for i in todo:
            try:
                await admin.ensure_consumers(jetstream.consumers(NS, agent_name(i), SPEC, 1))
            except Exception as exc:
                failures.append(f"{agent_name(i)}: {exc}")
            done += 1
            if done % step == 0 or done == agents:
                elapsed = time.monotonic() - started
                previous = marks[-1] if marks else {"agents": 0, "seconds": 0.0}
                per_agent = (elapsed - previous["seconds"]) / max(1, done - previous["agents"])
                marks.append({"agents": done, "seconds": round(elapsed, 2)})
                marks[-1]["ms_per_agent_in_step"] = round(per_agent * 1000, 2)
                log(f"  {done}/{agents} Agents in {elapsed:.1f}s ({per_agent * 1000:.1f} ms each)")

    await asyncio.gather(*(worker() for _ in range(workers)))
    return {
        "seconds": round(time.monotonic() - started, 2),
        "failures": len(failures),
        "first_failures": failures[:5],
        "curve": marks,
    }


async def redeclare(admin: JetStreamAdmin, agents: int) -> float:
    """Seconds per Agent to re-declare existing consumers (an operator restart)."""
    sample = range(0, agents, max(1, agents // RESAMPLE))
    started = time.monotonic()
    for i in sample:
        await admin.ensure_consumers(jetstream.consumers(NS, agent_name(i), SPEC, 1))
    return (time.monotonic() - started) / len(sample)


async def measure(server: Server, agents: int, workers: int) -> dict[str, Any]:
    await server.ready()
    admin = await JetStreamAdmin.connect(server.url)
    try:
        await admin.ensure_streams()
        await admin.ensure_buckets()
        pid = server.proc.pid
        rss0 = status_kib(pid, "VmRSS")
        log(f"declaring {agents} Agents ({agents * nl.CONSUMERS_PER_AGENT} consumers)")
        declared = await declare(admin, agents, workers)
        stream = await admin._request(f"STREAM.INFO.{nl.TASKS_STREAM}")
        consumers = int(stream["state"]["consumer_count"])
        redeclare_s = await redeclare(admin, agents)
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        await asyncio.sleep(IDLE_SECONDS)
        idle_cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        rss, hwm = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
    finally:
        await admin.close()
    grown = rss - rss0
    return {
        "agents": agents,
        "consumers": consumers,
        "consumers_expected": agents * nl.CONSUMERS_PER_AGENT,
        "stream_max_consumers": stream["config"]["max_consumers"],
        "workers": workers,
        "declare": declared,
        "declare_ms_per_agent": round(declared["seconds"] / agents * 1000, 2),
        "redeclare_ms_per_agent": round(redeclare_s * 1000, 2),
        "rss_before_mib": round(rss0 / 1024, 1),
        "rss_mib": round(rss / 1024, 1),
        "hwm_mib": round(hwm / 1024, 1),
        "rss_kib_per_consumer": round(grown / max(1, consumers), 1),
        "rss_kib_per_agent": round(grown / agents, 1),
        "idle_cpu_seconds_per_second": round(idle_cpu, 4),
    }


def markdown(r: dict[str, Any]) -> str:
    d = r["declare"]
    stop = r["stop_seconds"]
    rows = [
        ("Agents / band consumers", f"{r['agents']} / {r['consumers']}"),
        ("consumers refused", d["failures"]),
        ("SHOAL_TASKS max_consumers", r["stream_max_consumers"]),
        ("declaration, all Agents (s)", d["seconds"]),
        ("declaration per Agent, mean (ms)", r["declare_ms_per_agent"]),
        ("declaration per Agent, last tenth (ms)", d["curve"][-1]["ms_per_agent_in_step"]),
        ("re-declaration per Agent, existing (ms)", r["redeclare_ms_per_agent"]),
        ("nats-server VmRSS before -> after (MiB)", f"{r['rss_before_mib']} -> {r['rss_mib']}"),
        ("nats-server VmHWM (MiB)", r["hwm_mib"]),
        ("memory per consumer (KiB)", r["rss_kib_per_consumer"]),
        ("memory per Agent (KiB)", r["rss_kib_per_agent"]),
        ("idle CPU (s per s)", r["idle_cpu_seconds_per_second"]),
        ("stop, SIGTERM to exit (s)", "killed at limit" if stop is None else round(stop, 1)),
    ]
    curve = " | ".join(f"{m['agents']}: {m['seconds']}s" for m in d["curve"])
    return "\n".join(
        [
            f"JetStream at fleet scale: {r['agents']} Agents' band consumers on one "
            f"nats-server {r['nats_server']}, declared by the operator's JetStreamAdmin "
            f"({r['workers']} concurrent declarers), {r['machine']}.",
            "",
            "| measure | value |",
            "| --- | --- |",
            *(f"| {k} | {v} |" for k, v in rows),
            "",
            f"Declaration curve (Agents: seconds since start): {curve}",
            "",
        ]
    )


def server_version() -> str:
    out = subprocess.run([str(nats_server_bin()), "--version"], capture_output=True, text=True)
    return out.stdout.strip().rpartition(" ")[2] or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=8, help="concurrent declarers")
    p.add_argument("--stop-limit", type=float, default=300.0, help="seconds to wait for exit")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory of jetstream.json/.md")
    args = p.parse_args()
    results_meta.start()
    with tempfile.TemporaryDirectory(prefix="shoal-js-bench-") as tmp:
        server = Server(Path(tmp) / "nats")
        stop: float | None = None
        try:
            result = asyncio.run(measure(server, args.agents, args.workers))
        finally:
            log("stopping nats-server")
            stop = server.stop(args.stop_limit)
    result.update(
        stop_seconds=None if stop is None else round(stop, 1),
        nats_server=server_version(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "jetstream.json").write_text(
        json.dumps(results_meta.stamp_json(result), indent=2) + "\n"
    )
    md = results_meta.stamp_markdown(markdown(result))
    (args.out / "jetstream.md").write_text(md)
    print(md)
    return 1 if result["declare"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
