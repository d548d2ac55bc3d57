"""Operator at scale on the local control plane (issue: 1,000 Agents, each with a policy).

Two phases, each on a fresh test bed, in one invocation so the ratios compare like
with like on a noisy machine:

- baseline: the same 1,000 ServiceAccounts, Deployments and HPAs created directly through
  the API, as if no operator existed. Time until every Deployment is available; spec-change latency
  is patch -> Deployment change seen on a watch (the API round trip, the floor).
- shoal: 1,000 Agents + 1,000 ScalingPolicies created at once; time until every Agent
  is Ready; latency from an Agent spec change to the Deployment update seen on a watch;
  the operator's peak RSS (VmHWM), next to its RSS when idle.

Writes bench/results/operator.json and bench/results/operator.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import results_meta
from kubernetes_asyncio import client, config, watch

from shoal_api.agent import AgentSpec
from shoal_api.pod_contract import CONFIG_ENV
from shoal_api.scaling import ScalingPolicySpec
from shoal_operator.builders.common import Owner
from shoal_operator.builders.deployment import (
    RuntimeDefaults,
    deployment,
    service_account,
)
from shoal_operator.builders.hpa import hpa
from shoal_operator.clients.kube import Kube
from shoal_testbed.binaries import operator_python
from shoal_testbed.cluster import LocalCluster, free_port

REPO = Path(__file__).resolve().parents[1]
NS = "bench"
CREATE_CONCURRENCY = 32


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def agent_body(i: int, concurrency: int = 4) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": f"agent-{i:04d}", "namespace": NS},
        "spec": {"handler": {"python": "shoal_examples.echo:handle"}, "concurrency": concurrency},
    }


def policy_body(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": f"agent-{i:04d}", "namespace": NS},
        "spec": {"targetRef": {"name": f"agent-{i:04d}"}, "minReplicas": 1, "maxReplicas": 5},
    }


async def bounded(jobs: list[Callable[[], Awaitable[Any]]], limit: int) -> None:
    sem = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await job()

    await asyncio.gather(*(run(j) for j in jobs))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class DeploymentWatch:
    """Records when each Deployment's runtime config first shows a given concurrency."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        # The benchmark's own client: the operator's Kube has no kubernetes_asyncio inside.
        api = await config.new_client_from_config(config_file=os.environ["KUBECONFIG"])
        try:
            await self._run(api)
        finally:
            await api.close()

    async def _run(self, api: client.ApiClient) -> None:
        apps = client.AppsV1Api(api)
        while True:
            w = watch.Watch()
            async with w.stream(apps.list_namespaced_deployment, NS, timeout_seconds=300) as s:
                async for event in s:
                    dep = event["object"]
                    for env in dep.spec.template.spec.containers[0].env or []:
                        if env.name == CONFIG_ENV and env.value:
                            conc = json.loads(env.value)["spec"]["concurrency"]
                            self.seen.setdefault((dep.metadata.name, conc), time.monotonic())
                        elif env.name == "BENCH_CONCURRENCY":
                            key = (dep.metadata.name, int(env.value))
                            self.seen.setdefault(key, time.monotonic())

    async def wait_for(self, name: str, concurrency: int, limit: float = 30) -> float:
        deadline = time.monotonic() + limit
        while (name, concurrency) not in self.seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} never showed concurrency {concurrency}")
            await asyncio.sleep(0.005)
        return self.seen[(name, concurrency)]

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def count_ready(kube: Kube, kind: str) -> int:
    items = await kube.list_items(kind, NS)
    if kind == "Deployment":
        return sum(
            1
            for d in items
            if (d.get("status") or {}).get("availableReplicas", 0) >= d["spec"].get("replicas", 1)
        )
    return sum(
        1
        for a in items
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (a.get("status") or {}).get("conditions", [])
        )
    )


async def wait_all(kube: Kube, kind: str, n: int, started: float, limit: float) -> float:
    last = -1
    while True:
        ready = await count_ready(kube, kind)
        OWN_LISTS[kind] = OWN_LISTS.get(kind, 0) + 1
        if ready != last:
            log(f"  {ready}/{n} {kind} ready after {time.monotonic() - started:.1f}s")
            last = ready
        if ready >= n:
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            raise TimeoutError(f"only {ready}/{n} {kind} ready after {limit}s")
        await asyncio.sleep(0.5)


async def latencies(
    patch: Callable[[int, int], Awaitable[Any]], dw: DeploymentWatch, samples: int, n: int
) -> list[float]:
    out = []
    for k in range(samples):
        i = (k * 37) % n
        new = 100 + k
        t0 = time.monotonic()
        await patch(i, new)
        out.append(await dw.wait_for(f"agent-{i:04d}", new) - t0)
        await asyncio.sleep(0.05)
    return out


async def phase_baseline(cluster: LocalCluster, n: int, samples: int) -> dict[str, Any]:
    kube = await Kube.connect()
    defaults = RuntimeDefaults(image="bench", nats_url="nats://bench")
    spec = AgentSpec.model_validate({"handler": {"python": "m:f"}, "concurrency": 4})
    pspec = ScalingPolicySpec.model_validate({"targetRef": {"name": "x"}, "maxReplicas": 5})

    def objects(i: int) -> list[dict[str, Any]]:
        owner = Owner("Agent", NS, f"agent-{i:04d}", "00000000-0000-0000-0000-000000000000")
        dep = deployment(owner, spec, defaults, 1)
        dep["metadata"].pop("ownerReferences")
        dep["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "BENCH_CONCURRENCY", "value": "4"}
        )
        h = hpa(
            owner,
            pspec.model_copy(
                update={"target_ref": pspec.target_ref.model_copy(update={"name": owner.name})}
            ),
        )
        h["metadata"].pop("ownerReferences")
        sa = service_account(owner)
        sa["metadata"].pop("ownerReferences")
        return [sa, dep, h]

    dw = DeploymentWatch()
    dw.start()
    pids = control_plane_pids(cluster)
    load = phase_load(cluster.kubeconfig, pids)
    OWN_LISTS.clear()
    started = time.monotonic()
    await bounded(
        [partial(kube.apply, o) for i in range(n) for o in objects(i)], CREATE_CONCURRENCY
    )
    log(f"  created {3 * n} objects in {time.monotonic() - started:.1f}s")
    all_ready = await wait_all(kube, "Deployment", n, started, 300)
    own = {f"APPLY {r}": n for r in ("serviceaccounts", "apps/deployments")}
    own["APPLY autoscaling/horizontalpodautoscalers"] = n
    own["LIST apps/deployments"] = OWN_LISTS["Deployment"]
    load = phase_load(cluster.kubeconfig, pids, load, own)

    async def patch(i: int, value: int) -> None:
        await kube.json_patch(
            "Deployment",
            NS,
            f"agent-{i:04d}",
            [
                {
                    "op": "replace",
                    "path": "/spec/template/spec/containers/0/env/5/value",
                    "value": str(value),
                }
            ],
        )

    lat = await latencies(patch, dw, samples, n)
    dw.stop()
    await kube.close()
    return {
        "all_ready_seconds": all_ready,
        "latency_p50_seconds": statistics.median(lat),
        "latency_p99_seconds": percentile(lat, 0.99),
        "load": load,
    }


OWN_LISTS: dict[str, int] = {}
"""LIST requests of wait_all's polling, by kind (the bench's own, not the operator's)."""


def phase_load(
    kubeconfig: Path,
    pids: dict[str, int],
    before: dict[str, Any] | None = None,
    own: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The API server's request counter (``apiserver_request_total`` summed by verb and
    resource, watches left out) and the CPU seconds (utime + stime) of each process; given
    ``before``, what happened since, less ``own`` (the bench's own requests)."""
    raw = subprocess.run(
        [str(cluster_kubectl()), f"--kubeconfig={kubeconfig}", "get", "--raw", "/metrics"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    requests: dict[str, float] = {}
    for line in raw.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(
            kv.split("=", 1) for kv in line[line.index("{") + 1 : line.rindex("}")].split(",")
        )
        label = {k: v.strip('"') for k, v in labels.items()}
        if not label.get("resource") or label["verb"] == "WATCH":
            continue
        res = "/".join(
            x for x in (label.get("group"), label["resource"], label.get("subresource")) if x
        )
        key = f"{label['verb']} {res}"
        requests[key] = requests.get(key, 0) + float(line.rsplit(" ", 1)[1])
    tick = os.sysconf("SC_CLK_TCK")
    cpu: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu[name] = (int(fields[11]) + int(fields[12])) / tick
    if before is None:
        return {"requests": requests, "cpu_seconds": cpu}
    return {
        "requests": {
            k: d
            for k, v in sorted(requests.items())
            if (d := int(v - before["requests"].get(k, 0) - (own or {}).get(k, 0)))
        },
        "cpu_seconds": {k: round(v - before["cpu_seconds"].get(k, 0.0), 2) for k, v in cpu.items()},
    }


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


async def phase_shoal(cluster: LocalCluster, n: int, samples: int) -> dict[str, Any]:
    kube = await Kube.connect()
    logf = Path(tempfile.mkstemp(prefix="bench-operator-", suffix=".log")[1])
    env = {**os.environ, "SHOAL_OPERATOR_NAMESPACE": NS, "SHOAL_NATS_URL": cluster.nats_url}
    with logf.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(operator_python()),  # the operator distribution alone, as it ships
                "-m",
                "shoal_operator",
                "--namespace",
                NS,
                "--liveness",
                # kopf reads port 0 as 80: a free port of its own.
                f"http://127.0.0.1:{free_port()}/healthz",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        await asyncio.sleep(5)
        idle_rss = rss_kib(proc.pid, "VmRSS")
        dw = DeploymentWatch()
        dw.start()
        pids = {**control_plane_pids(cluster), "operator": proc.pid}
        load = phase_load(cluster.kubeconfig, pids)
        OWN_LISTS.clear()
        started = time.monotonic()
        jobs: list[Callable[[], Awaitable[Any]]] = []
        for i in range(n):
            jobs.append(partial(kube.create, "Agent", NS, agent_body(i)))
            jobs.append(partial(kube.create, "ScalingPolicy", NS, policy_body(i)))
        await bounded(jobs, CREATE_CONCURRENCY)
        log(f"  created {2 * n} objects in {time.monotonic() - started:.1f}s")
        all_ready = await wait_all(kube, "Agent", n, started, 900)
        own = {"POST shoal.dev/agents": n, "POST shoal.dev/scalingpolicies": n}
        own["LIST shoal.dev/agents"] = OWN_LISTS["Agent"]
        load = phase_load(cluster.kubeconfig, pids, load, own)

        async def patch(i: int, value: int) -> None:
            await kube.merge_patch("Agent", NS, f"agent-{i:04d}", {"spec": {"concurrency": value}})

        lat = await latencies(patch, dw, samples, n)
        dw.stop()
        peak = rss_kib(proc.pid, "VmHWM")
        if proc.poll() is not None:
            raise RuntimeError("operator exited: " + logf.read_text()[-2000:])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        await kube.close()
    return {
        "all_ready_seconds": all_ready,
        "latency_p50_seconds": statistics.median(lat),
        "latency_p99_seconds": percentile(lat, 0.99),
        "peak_rss_mib": peak / 1024,
        "idle_rss_mib": idle_rss / 1024,
        "load": load,
    }


def with_cluster(
    fn: Callable[[LocalCluster], Coroutine[Any, Any, dict[str, Any]]],
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster")
        try:
            cluster.up(kubelet=False)
            os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
            kubectl = [str(cluster_kubectl()), f"--kubeconfig={cluster.kubeconfig}"]
            subprocess.run(
                [*kubectl, "apply", "--server-side", "-k", str(REPO / "crds")],
                check=True,
                capture_output=True,
            )
            subprocess.run([*kubectl, "create", "namespace", NS], check=True, capture_output=True)
            return asyncio.run(fn(cluster))
        finally:
            cluster.down()


def control_plane_pids(cluster: LocalCluster) -> dict[str, int]:
    names = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")
    return {c: int((cluster.pids / f"{c}.pid").read_text()) for c in names}


def cluster_kubectl() -> Path:
    from shoal_testbed.binaries import control_plane_bin

    return control_plane_bin() / "kubectl"


def markdown(n: int, base: dict[str, Any], shoal: dict[str, Any]) -> str:
    rows = [
        ("all Ready after creating them at once (s)", "all_ready_seconds", "<= 60"),
        ("spec change -> Deployment updated, p50 (s)", "latency_p50_seconds", ""),
        ("spec change -> Deployment updated, p99 (s)", "latency_p99_seconds", "<= 1"),
    ]
    out = [
        f"Operator at scale: {n} Agents + {n} ScalingPolicies, local control plane "
        "(2 cores). Baseline: the same ServiceAccounts, Deployments and HPAs created "
        "directly, no operator.",
        "",
        "| measure | baseline | Shoal | ratio | goal |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, key, goal in rows:
        ratio = shoal[key] / base[key] if base[key] else float("nan")
        out.append(f"| {label} | {base[key]:.3f} | {shoal[key]:.3f} | {ratio:.2f}x | {goal} |")
    out.append(
        f"| operator peak RSS (MiB) | idle {shoal['idle_rss_mib']:.0f} | "
        f"{shoal['peak_rss_mib']:.0f} | "
        f"{shoal['peak_rss_mib'] / shoal['idle_rss_mib']:.2f}x | <= 150 |"
    )
    return "\n".join(out + load_markdown(n, base["load"], shoal["load"])) + "\n"


def load_markdown(n: int, base: dict[str, Any], shoal: dict[str, Any]) -> list[str]:
    """Requests per Agent by verb and resource, from creation to all Ready, less the bench's
    own; the operator's share is the Shoal phase less the baseline (the controllers, the
    scheduler and kwok do the same work in both). Then CPU seconds per process."""
    keys = sorted(set(base["requests"]) | set(shoal["requests"]))
    out = [
        "",
        "API requests per Agent, creation -> all Ready (watches left out):",
        "",
        "| verb resource | baseline | Shoal | operator |",
        "| --- | --- | --- | --- |",
    ]
    total = 0.0
    for k in keys:
        b, s = base["requests"].get(k, 0) / n, shoal["requests"].get(k, 0) / n
        total += s - b
        out.append(f"| {k} | {b:.2f} | {s:.2f} | {s - b:+.2f} |")
    out.append(f"| **total** | | | **{total:+.2f}** |")
    out += ["", "CPU seconds (utime + stime) over the same span:", ""]
    out += ["| process | baseline | Shoal |", "| --- | --- | --- |"]
    for proc in sorted(set(base["cpu_seconds"]) | set(shoal["cpu_seconds"])):
        b_cpu, s_cpu = base["cpu_seconds"].get(proc), shoal["cpu_seconds"].get(proc)
        out.append(f"| {proc} | {b_cpu if b_cpu is not None else '-'} | {s_cpu} |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    results_meta.start()
    log(f"baseline: {args.agents} Deployments + HPAs created directly")
    base = with_cluster(lambda c: phase_baseline(c, args.agents, args.samples))
    log(f"shoal: {args.agents} Agents + ScalingPolicies through the operator")
    shoal = with_cluster(lambda c: phase_shoal(c, args.agents, args.samples))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"agents": args.agents, "samples": args.samples, "baseline": base, "shoal": shoal}
    result["operator_requests_per_agent"] = {
        k: round(
            (shoal["load"]["requests"].get(k, 0) - base["load"]["requests"].get(k, 0))
            / args.agents,
            3,
        )
        for k in sorted(set(base["load"]["requests"]) | set(shoal["load"]["requests"]))
    }
    result = results_meta.stamp_json(result)
    (args.out / "operator.json").write_text(json.dumps(result, indent=2) + "\n")
    table = results_meta.stamp_markdown(markdown(args.agents, base, shoal))
    (args.out / "operator.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
