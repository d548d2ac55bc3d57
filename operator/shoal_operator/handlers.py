"""kopf glue: watches fill the cache (indexes) and queue keys; the controller does the rest.

kopf guarantees every index is populated from the initial listing before any other
handler runs, so the first reconcile already sees every Agent, policy and child.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import replace
from typing import Any

import kopf

from shoal_api.base import GROUP, VERSION
from shoal_operator.builders.common import AGENT_LABEL, MANAGED_BY, POLICY_LABEL
from shoal_operator.builders.deployment import RuntimeDefaults
from shoal_operator.controller import Controller, ControllerConfig, Indexes
from shoal_operator.health import HEARTBEAT_LABEL, Heartbeat
from shoal_operator.jetstream_admin import JetStreamAdmin
from shoal_operator.kube import Kube
from shoal_operator.leader import LeaderElector
from shoal_operator.scaling import (
    MAX_AGE_SECONDS,
    MetricsApiConfig,
    MetricsApiServer,
    QueueMetrics,
    Registration,
)
from shoal_operator.settings import FIELD_MANAGER, HANDOVER_MANAGER, configure

log = logging.getLogger("shoal_operator")

DEFAULT_METRICS_PORT = 9090
DEFAULT_RUNTIME_IMAGE = "ghcr.io/shoal-dev/shoal-runtime:0.1.0"
STATE: dict[str, Any] = {}
CHILD_LABELS = dict(MANAGED_BY)


def _controller() -> Controller | None:
    ctl: Controller | None = STATE.get("controller")
    return ctl


# -- the watch cache -------------------------------------------------------------------
# Handlers are coroutines: kopf runs sync handlers in a thread pool, a thread hop per
# watch event that costs CPU and memory (an allocator arena per thread) at scale.


def _ns(namespace: str | None) -> str:
    if namespace is None:  # all watched kinds are namespaced
        raise ValueError("cluster-scoped object where a namespaced one was expected")
    return namespace


_META_KEPT = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "labels",
    "finalizers",
    "deletionTimestamp",
    "ownerReferences",
)
_OUR_MANAGERS = (FIELD_MANAGER, HANDOVER_MANAGER)


def _entry(body: kopf.Body, spec: bool = True) -> dict[str, Any]:
    """What the cache keeps of an object: enough to reconcile, not the whole body (the
    last-applied annotation and managedFields of 1,000 objects weigh megabytes)."""
    meta = body.get("metadata", {})
    out: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in _META_KEPT if k in meta},
        "status": body.get("status") or {},
    }
    if spec:
        out["spec"] = body.get("spec") or {}
    return out


def _child_entry(body: kopf.Body) -> dict[str, Any]:
    """A child keeps its replicas and our own managedFields (for the HPA handover)."""
    out = _entry(body, spec=False)
    out["spec"] = {"replicas": (body.get("spec") or {}).get("replicas")}
    out["metadata"]["managedFields"] = [
        m
        for m in body.get("metadata", {}).get("managedFields") or []
        if m.get("manager") in _OUR_MANAGERS
    ]
    return out


@kopf.index(GROUP, VERSION, "agents")
async def shoal_agents(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(_ns(namespace), name): _entry(body)}


@kopf.index(GROUP, VERSION, "agents")
async def shoal_agents_by_reference(
    *, namespace: str | None, name: str, spec: kopf.Spec, **_: Any
) -> Any:
    """(namespace, Agent) -> the Agents that name it as fallback or escalation."""
    refs = {(spec.get(k) or {}).get("agent") for k in ("fallback", "escalation")} - {None}
    return {(_ns(namespace), ref): name for ref in refs} or None


@kopf.index(GROUP, VERSION, "agents")
async def shoal_agents_by_ns(*, namespace: str | None, name: str, **_: Any) -> Any:
    return {_ns(namespace): name}


@kopf.index(GROUP, VERSION, "scalingpolicies")
async def shoal_policies(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(_ns(namespace), name): _entry(body)}


@kopf.index(GROUP, VERSION, "scalingpolicies")
async def shoal_policies_by_target(
    *, namespace: str | None, name: str, spec: kopf.Spec, **_: Any
) -> Any:
    target = (spec.get("targetRef") or {}).get("name")
    return {(_ns(namespace), target): name} if target else None


@kopf.index(GROUP, VERSION, "workflows")
async def shoal_workflows(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(_ns(namespace), name): _entry(body)}


@kopf.index(GROUP, VERSION, "workflows")
async def shoal_workflows_by_ns(*, namespace: str | None, name: str, **_: Any) -> Any:
    return {_ns(namespace): name}


@kopf.index("apps", "v1", "deployments", labels=CHILD_LABELS)
async def shoal_deployments(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(_ns(namespace), name): _child_entry(body)}


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD_LABELS)
async def shoal_hpas(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(_ns(namespace), name): _entry(body, spec=False)}


# -- lifecycle --------------------------------------------------------------------------


@kopf.on.login()
def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # kopf's default login through kubernetes_asyncio reads the KUBECONFIG the library
    # captured when first imported; these read the environment now.
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(
        **kwargs
    ) or kopf.login_with_kubeconfig(**kwargs)
    return info


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    configure(settings)
    kube = await Kube.connect()
    runtime = RuntimeDefaults(
        image=os.environ.get("SHOAL_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE),
        nats_url=os.environ.get("SHOAL_RUNTIME_NATS_URL")
        or os.environ.get("SHOAL_NATS_URL", "nats://nats:4222"),
    )
    ctl = Controller(
        kube,
        ControllerConfig(
            runtime=runtime,
            workers=int(os.environ.get("SHOAL_WORKERS", ControllerConfig.workers)),
            drift_interval=float(
                os.environ.get("SHOAL_DRIFT_INTERVAL", ControllerConfig.drift_interval)
            ),
        ),
    )
    ctl.indexes = Indexes(
        agents=kwargs["shoal_agents"],
        policies=kwargs["shoal_policies"],
        workflows=kwargs["shoal_workflows"],
        deployments=kwargs["shoal_deployments"],
        hpas=kwargs["shoal_hpas"],
        agents_by_ns=kwargs["shoal_agents_by_ns"],
        agents_by_reference=kwargs["shoal_agents_by_reference"],
        policies_by_target=kwargs["shoal_policies_by_target"],
        workflows_by_ns=kwargs["shoal_workflows_by_ns"],
    )
    STATE["controller"] = ctl
    STATE["tasks"] = [asyncio.create_task(_connect_nats(ctl), name="shoal-nats")]
    # Leases (leader election, watch heartbeat) live in the operator's own namespace.
    own_ns = os.environ.get("SHOAL_OPERATOR_NAMESPACE")
    identity = f"{socket.gethostname()}-{os.getpid()}"
    if own_ns:
        hb = Heartbeat(
            own_ns,
            f"shoal-operator-{identity}",
            interval=float(os.environ.get("SHOAL_HEARTBEAT_INTERVAL", "10")),
        )
        STATE["heartbeat"] = hb
        STATE["tasks"].append(asyncio.create_task(hb.run(kube), name="shoal-heartbeat"))
        if os.environ.get("SHOAL_LEADER_ELECTION", "true") != "false":
            ctl.leader = LeaderElector(kube, own_ns, identity)
            STATE["tasks"].append(asyncio.create_task(ctl.leader.run(), name="shoal-leader"))
    else:
        log.warning(
            "SHOAL_OPERATOR_NAMESPACE is not set: no leader election (run one replica) "
            "and no watch heartbeat"
        )
    ctl.start()
    await _start_metrics_api(ctl, own_ns)
    log.info("Shoal operator started (runtime image %s)", runtime.image)


async def _start_metrics_api(ctl: Controller, own_ns: str | None) -> None:
    """external.metrics.k8s.io for the HPAs; every replica serves, whoever leads."""
    # SHOAL_METRICS_MAX_AGE: how stale a served value may be (default 0.5 s). The
    # reaction benchmark sets 30 s to play a 30 s poller (KEDA's default) as baseline.
    metrics = QueueMetrics(
        lambda: ctl.nats,
        max_age=float(os.environ.get("SHOAL_METRICS_MAX_AGE", MAX_AGE_SECONDS)),
    )
    STATE["queue_metrics"] = metrics
    STATE["tasks"].append(asyncio.create_task(ctl.run_autoscaler(metrics), name="shoal-autoscaler"))

    async def lag(namespace: str, agent: str) -> int | None:
        # LeastLag reads the same cached figures the HPA gets; a missing one is no veto.
        try:
            pending, in_flight = await metrics.lag(namespace, agent)
        except Exception:
            return None
        return pending + in_flight

    STATE["tasks"].append(asyncio.create_task(ctl.run_dispatcher(lag), name="shoal-dispatcher"))
    ctl.run_metrics.watch_queues(lambda: ctl.dispatcher.queues() if ctl.dispatcher else {})
    port = int(os.environ.get("SHOAL_OPERATOR_METRICS_PORT", DEFAULT_METRICS_PORT))
    if port:
        try:
            ctl.run_metrics.serve(port)
        except OSError as exc:
            log.error("operator metrics off: cannot listen on port %s: %s", port, exc)
        else:
            log.info("operator metrics on :%s/metrics", port)
    try:
        config = MetricsApiConfig.from_env(os.environ)
    except ValueError as exc:
        log.error("metrics API off: %s", exc)
        return
    server: MetricsApiServer | None = None
    if config.port is None:
        log.info("metrics API off (port 0): HPAs of ScalingPolicies get no Shoal metrics")
    else:
        local = config.register == "local"
        hosts = ["localhost", "127.0.0.1"]
        if own_ns:
            hosts += [
                f"{config.service}.{own_ns}.svc",
                f"{config.service}.{own_ns}.svc.cluster.local",
            ]
        # An operator outside the cluster is reached through localhost: nothing else
        # needs to reach it, and what is not exposed needs no authentication.
        server = MetricsApiServer(metrics, config, "127.0.0.1" if local else "0.0.0.0", hosts)
        try:
            await server.start()
        except OSError as exc:
            log.error("metrics API off: cannot listen on port %s: %s", config.port, exc)
            server = None
        else:
            STATE["metrics_api"] = server
    if not own_ns:
        log.warning("SHOAL_OPERATOR_NAMESPACE is not set: the APIService is not checked")
        return
    # Without a server nothing is registered, but whose APIService it is still shows on
    # the policies (another provider's, typically, when the metrics API is turned off).
    if server is None:
        config = replace(config, register="none")
    registration = Registration(
        ctl.kube, config, own_ns, server.port if server else 0, ctl.on_metrics_provider
    )
    STATE["registration"] = registration
    STATE["registration_task"] = asyncio.create_task(registration.run(), name="shoal-apiservice")


async def _connect_nats(ctl: Controller) -> None:
    """Connects to NATS and declares streams and buckets, retrying until it works."""
    url = os.environ.get("SHOAL_NATS_URL", "nats://nats:4222")
    delay = 1.0
    while True:
        try:
            admin = await JetStreamAdmin.connect(url)
            await admin.ensure_streams()
            await admin.ensure_buckets()
        except Exception as exc:
            log.warning("NATS at %s not usable yet (%s); retrying in %.0fs", url, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30)
            continue
        ctl.nats = admin
        ctl.nats_ready.set()
        log.info("connected to NATS at %s", url)
        return


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    ctl = _controller()
    for task in STATE.pop("tasks", []):
        task.cancel()
    hb: Heartbeat | None = STATE.pop("heartbeat", None)
    registration: Registration | None = STATE.pop("registration", None)
    if (task := STATE.pop("registration_task", None)) is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if registration is not None:
        try:
            await registration.unregister()
        except Exception as exc:
            log.warning("metrics API: could not remove the APIService: %s", exc)
    server: MetricsApiServer | None = STATE.pop("metrics_api", None)
    if server is not None:
        await server.stop()
    if ctl is not None:
        await ctl.stop()
        if ctl.leader is not None:
            await ctl.leader.release()
        if hb is not None:
            await ctl.kube.delete("Lease", hb.namespace, hb.name)
        if ctl.nats is not None:
            await ctl.nats.close()
        await ctl.kube.close()
    STATE.clear()


@kopf.on.probe(id="watch")
async def _watch_probe(**_: Any) -> str:
    """Fails the liveness endpoint when the heartbeat Lease stops coming back."""
    hb: Heartbeat | None = STATE.get("heartbeat")
    if hb is None:
        return "no heartbeat configured"
    stalled = hb.stalled_for(time.monotonic())
    if stalled is not None:
        raise RuntimeError(f"no watch event for {stalled:.0f}s: watching has stalled")
    return "ok"


# -- triggers ---------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, "agents")
async def _agent_event(
    *, namespace: str | None, name: str, type: str, body: kopf.Body, **_: Any
) -> None:
    if (ctl := _controller()) is not None:
        ctl.on_agent(_ns(namespace), name, None if type == "DELETED" else body)


@kopf.on.event(GROUP, VERSION, "scalingpolicies")
async def _policy_event(
    *, namespace: str | None, name: str, type: str, body: kopf.Body, **_: Any
) -> None:
    if (ctl := _controller()) is not None:
        ctl.on_policy(_ns(namespace), name, None if type == "DELETED" else body)


@kopf.on.event(GROUP, VERSION, "workflows")
async def _workflow_event(*, namespace: str | None, name: str, **_: Any) -> None:
    if (ctl := _controller()) is not None:
        ctl.on_workflow(_ns(namespace), name)


@kopf.on.event(GROUP, VERSION, "approvals")
async def _approval_event(
    *, namespace: str | None, name: str, type: str, body: kopf.Body, **_: Any
) -> None:
    # An event handler, not on.create/on.resume: those keep their progress in annotations
    # on the object, and the operator may only write an Approval's status. The initial
    # listing plays the part of resume; the status phase says what is done.
    if (ctl := _controller()) is not None:
        await ctl.on_approval(_ns(namespace), name, None if type == "DELETED" else body)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
async def _deployment_event(*, namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
    if (ctl := _controller()) is not None and (agent := labels.get(AGENT_LABEL)):
        ctl.on_deployment(_ns(namespace), agent)


@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD_LABELS)
async def _hpa_event(*, namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
    if (ctl := _controller()) is not None and (policy := labels.get(POLICY_LABEL)):
        ctl.queue.add(("ScalingPolicy", _ns(namespace), policy))


@kopf.on.event("coordination.k8s.io", "v1", "leases", labels={HEARTBEAT_LABEL: "true"})
async def _heartbeat_event(*, name: str, **_: Any) -> None:
    hb: Heartbeat | None = STATE.get("heartbeat")
    if hb is not None and name == hb.name:
        hb.seen()
