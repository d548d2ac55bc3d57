"""Reaction time of queue-driven scaling on the local control plane.

From a burst of tasks being published to the HPA's desired replicas rising, with the
real kube-controller-manager HPA at its default 15 s sync period. Two operators are
measured in one invocation, alternating trials on the same cluster:

- Shoal: the external metrics served fresh (at most 0.5 s old);
- baseline: the same operator with values cached for 30 s, playing a 30 s metrics
  poller (KEDA's default pollingInterval) in front of the same HPA.

Also reported: metric freshness, the time from the publish to `kubectl get --raw` on
external.metrics.k8s.io showing the new queue lag. Pods run nothing here (namespace
labelled ``shoal.dev/standin=off``), so the lag stays until the trial purges it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import results_meta

from shoal_api import envelope as env
from shoal_api import nats_layout as nl
from shoal_testbed.binaries import control_plane_bin, operator_python
from shoal_testbed.cluster import LocalCluster, free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
NS = "bench"
AGENT = "burst"
BURST = 200
LAG_TARGET = 10


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.argv = [str(control_plane_bin() / "kubectl"), f"--kubeconfig={kubeconfig}"]

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run(
            [*self.argv, *args], input=stdin, capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))


def start_operator(cluster: LocalCluster, max_age: float, logfile: Path) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "SHOAL_NATS_URL": cluster.nats_url,
        "SHOAL_OPERATOR_NAMESPACE": NS,
        "SHOAL_REGISTER_APISERVICE": "local",
        "SHOAL_METRICS_API_PORT": str(free_port()),
        "SHOAL_METRICS_MAX_AGE": str(max_age),
    }
    out = logfile.open("ab")
    return subprocess.Popen(
        [str(operator_python()), "-m", "shoal_operator", "--namespace", NS],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=environ,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def publish(url: str, n: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    tasks = [env.Task(id=env.new_task_id(), input={"seconds": 60}) for _ in range(n)]
    await asyncio.gather(
        *(
            js.publish(
                nl.task_subject(NS, AGENT, 5), t.to_json(), headers={env.MSG_ID_HEADER: t.msg_id()}
            )
            for t in tasks
        )
    )
    await nc.close()


async def purge(url: str) -> None:
    nc = await nats.connect(url)
    await nc.request(
        f"$JS.API.STREAM.PURGE.{nl.TASKS_STREAM}",
        json.dumps({"filter": nl.agent_task_filter(NS, AGENT)}).encode(),
        timeout=5,
    )
    await nc.close()


def served_lag(kubectl: Kubectl) -> int | None:
    path = (
        f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{NS}/shoal_queue_lag"
        f"?labelSelector=shoal.dev%2Fagent%3D{AGENT}"
    )
    try:
        doc = json.loads(kubectl("get", "--raw", path))
    except (RuntimeError, ValueError):
        return None
    items = doc.get("items", [])
    return int(float(str(items[0]["value"]).rstrip("m"))) if items else None


def desired(kubectl: Kubectl) -> int:
    hpa = kubectl.json("get", "hpa", AGENT, "-n", NS)
    return int(hpa.get("status", {}).get("desiredReplicas", 0))


def wait_for(what: str, fn: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"{what} not reached within {timeout}s")


def trial(cluster: LocalCluster, kubectl: Kubectl) -> dict[str, float]:
    """One burst: seconds until the served lag shows it, and until the HPA reacts."""
    wait_for("HPA back at 1 replica", lambda: desired(kubectl) == 1, 120, 0.5)
    wait_for("served lag 0", lambda: served_lag(kubectl) == 0, 60, 0.5)
    # A random phase against the HPA's 15 s sync and the baseline's 30 s cache.
    time.sleep((time.time() * 7.31) % 15)
    t0 = time.monotonic()
    asyncio.run(publish(cluster.nats_url, BURST))
    fresh = wait_for("lag served", lambda: (served_lag(kubectl) or 0) >= BURST, 60, 0.05)
    fresh_at = time.monotonic() - t0
    wait_for("HPA reaction", lambda: desired(kubectl) > 1, 90, 0.2)
    reacted = time.monotonic() - t0
    asyncio.run(purge(cluster.nats_url))
    assert fresh
    return {"freshness_s": fresh_at, "reaction_s": reacted}


def manifests() -> str:
    agent = {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": AGENT, "namespace": NS},
        "spec": {"handler": {"python": "shoal_examples.work:handle"}},
    }
    policy = {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": AGENT, "namespace": NS},
        "spec": {
            "targetRef": {"name": AGENT},
            "minReplicas": 1,
            "maxReplicas": 10,
            "metrics": [{"type": "QueueLag", "target": LAG_TARGET}],
            # Fast scale-down only so trials can reset; scale-up keeps the defaults.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}},
        },
    }
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [agent, policy]})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="bursts per operator")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results_meta.start()
    runs: dict[str, list[dict[str, float]]] = {"shoal": [], "poll30": []}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster")
        log("starting the local control plane (HPA sync period: the 15 s default)")
        try:
            cluster.up(kubelet=False)
            kubectl = Kubectl(cluster.kubeconfig)
            kubectl("apply", "--server-side", "-k", str(REPO / "crds"))
            kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
            kubectl("create", "namespace", NS)
            kubectl("label", "namespace", NS, "shoal.dev/standin=off")
            for i in range(args.trials):
                for name, max_age in (("shoal", 0.5), ("poll30", 30.0)):
                    proc = start_operator(cluster, max_age, Path(tmp) / f"operator-{name}.log")
                    try:
                        if i == 0 and name == "shoal":
                            kubectl("apply", "-f", "-", stdin=manifests())
                        wait_for("metrics served", lambda: served_lag(kubectl) is not None, 90, 0.5)
                        result = trial(cluster, kubectl)
                    finally:
                        stop(proc)
                    runs[name].append(result)
                    fresh, reacted = result["freshness_s"], result["reaction_s"]
                    log(
                        f"trial {i + 1}/{args.trials} {name}: lag served after {fresh:.2f}s, "
                        f"HPA reacted after {reacted:.1f}s"
                    )
        finally:
            cluster.down()
    report(runs, args.trials, args.out)
    return 0


def report(runs: dict[str, list[dict[str, float]]], trials: int, out: Path) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    doc = results_meta.stamp_json(
        {
            "trials": trials,
            "burst_tasks": BURST,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "runs": runs,
            "median": {n: {k: med(n, k) for k in ("freshness_s", "reaction_s")} for n in runs},
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscale.json").write_text(json.dumps(doc, indent=2) + "\n")
    shoal, base = med("shoal", "reaction_s"), med("poll30", "reaction_s")
    fresh = med("shoal", "freshness_s")
    lines = [
        f"Burst of {BURST} tasks -> HPA desiredReplicas rises, local control plane, real "
        f"kube-controller-manager HPA at its 15 s default sync, {trials} trials per operator "
        "alternated in one invocation, random phase against the sync.",
        "",
        "| operator | reaction p50 (s) | reaction max (s) | lag served after, p50 (s) |",
        "| --- | --- | --- | --- |",
        *(
            f"| {label} | {med(n, 'reaction_s'):.1f} | "
            f"{max(r['reaction_s'] for r in runs[n]):.1f} | {med(n, 'freshness_s'):.2f} |"
            for n, label in (
                ("shoal", "Shoal (values <= 0.5 s old)"),
                ("poll30", "baseline: the same, values cached 30 s (a 30 s poller)"),
            )
        ),
        "",
        "| goal | target | measured | met |",
        "| --- | --- | --- | --- |",
        f"| reaction, median | <= 20 s | {shoal:.1f} s ({base / shoal:.1f}x faster than the "
        f"30 s poller's {base:.1f} s) | {'met' if shoal <= 20 else 'not met'} |",
        f"| metric freshness | <= 1 s | {fresh:.2f} s | {'met' if fresh <= 1 else 'not met'} |",
        "",
    ]
    table = results_meta.stamp_markdown("\n".join(lines))
    (out / "autoscale.md").write_text(table)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
