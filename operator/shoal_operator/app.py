"""The running operator: every long-lived object, built from one configuration when
kopf starts the operator, and taken down in order when it stops.

This is where the parts meet (the watch cache, the writer, each kind's reconcile I/O,
the loop, the leader's engines, the clients), so that none of them has to reach for
another through a global: each gets what it uses, and tests build the few they need.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from shoal_operator.builders.deployment import RuntimeDefaults
from shoal_operator.cache import Cache, Indexes, Key
from shoal_operator.catalog import WatchCatalog
from shoal_operator.clients.health import Heartbeat
from shoal_operator.clients.jetstream import JetStreamLink
from shoal_operator.clients.kube import Kube
from shoal_operator.clients.leader import LeaderElector
from shoal_operator.config import OperatorConfig
from shoal_operator.controller import Controller
from shoal_operator.kinds.agent import AgentIO
from shoal_operator.kinds.approval import ApprovalRelay
from shoal_operator.kinds.scaling import PolicyIO
from shoal_operator.kinds.workflow import WorkflowIO
from shoal_operator.leadership import Charge
from shoal_operator.scaling import MetricsApiServer, QueueMetrics, Registration
from shoal_operator.supervision import AutoscaleSupervisor, RunSupervisor
from shoal_operator.triggers import Triggers
from shoal_operator.workqueue import WorkQueue
from shoal_operator.writer import Writer

log = logging.getLogger("shoal_operator")


@dataclass
class Running:
    """The parts of one run of the operator (start-up to clean-up)."""

    config: OperatorConfig
    kube: Kube
    cache: Cache
    link: JetStreamLink
    charge: Charge
    controller: Controller
    triggers: Triggers
    relay: ApprovalRelay
    runs: RunSupervisor
    autoscale: AutoscaleSupervisor
    heartbeat: Heartbeat | None = None
    metrics_api: MetricsApiServer | None = None
    registration: Registration | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _registration_task: asyncio.Task[None] | None = None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))


def assemble(config: OperatorConfig, kube: Kube, indexes: Indexes) -> Running:
    """The parts, wired; nothing runs yet."""
    queue: WorkQueue[Key] = WorkQueue()
    cache = Cache(indexes)
    link = JetStreamLink()
    leader = None
    identity = f"{socket.gethostname()}-{os.getpid()}"
    if not config.leads_alone:
        assert config.own_namespace is not None
        leader = LeaderElector(kube, config.own_namespace, identity)
    charge = Charge(leader, link.ready)
    writer = Writer(kube, lambda key, delay: queue.add_after(key, delay))
    relay = ApprovalRelay(kube, leader)
    catalog = WatchCatalog(cache)
    autoscale = AutoscaleSupervisor(link, cache, kube, charge, queue)
    policies = PolicyIO(cache, writer, autoscale.plan)
    triggers = Triggers(queue, cache, writer, policies)
    runs = RunSupervisor(link, catalog, charge, relay, triggers.on_workflow)
    runtime = RuntimeDefaults(image=config.runtime_image, nats_url=config.runtime_nats_url)
    controller = Controller(
        queue,
        cache,
        charge,
        AgentIO(kube, cache, writer, runtime, link.get),
        policies,
        WorkflowIO(cache, writer, runs),
        workers=config.workers,
        drift_interval=config.drift_interval,
    )
    heartbeat = None
    if config.own_namespace:
        heartbeat = Heartbeat(
            config.own_namespace,
            f"shoal-operator-{identity}",
            interval=config.heartbeat_interval,
        )
    return Running(
        config, kube, cache, link, charge, controller, triggers, relay, runs, autoscale, heartbeat
    )


async def start(parts: Running) -> None:
    config = parts.config
    parts.spawn(parts.link.connect(config.nats_url), "shoal-nats")
    # Leases (leader election, watch heartbeat) live in the operator's own namespace.
    if parts.heartbeat is not None:
        parts.spawn(parts.heartbeat.run(parts.kube), "shoal-heartbeat")
        if parts.charge.leader is not None:
            parts.spawn(parts.charge.leader.run(), "shoal-leader")
    else:
        log.warning(
            "SHOAL_OPERATOR_NAMESPACE is not set: no leader election (run one replica) "
            "and no watch heartbeat"
        )
    parts.charge.started = time.monotonic()
    parts.controller.start()
    parts.spawn(parts.triggers.watch_runtime_state(parts.link), "shoal-runtime-state")
    parts.spawn(parts.relay.retry_waiting(), "shoal-approvals")
    await _start_metrics(parts)
    log.info("Shoal operator started (runtime image %s)", config.runtime_image)


async def _start_metrics(parts: Running) -> None:
    """The autoscaler and dispatcher (fed by the queue figures), the operator's own
    metrics, and external.metrics.k8s.io for the HPAs; every replica serves, whoever
    leads."""
    config = parts.config
    own_ns = config.own_namespace
    # max age: how stale a served value may be (default 0.5 s). The reaction
    # benchmark sets 30 s to play a 30 s poller (KEDA's default) as baseline.
    metrics = QueueMetrics(parts.link.get, max_age=config.metrics_max_age)
    parts.spawn(parts.autoscale.run(metrics), "shoal-autoscaler")

    async def lag(namespace: str, agent: str) -> int | None:
        # LeastLag reads the same cached figures the HPA gets; a missing one is no veto.
        try:
            pending, in_flight = await metrics.lag(namespace, agent)
        except Exception:
            return None
        return pending + in_flight

    parts.spawn(parts.runs.run(lag), "shoal-dispatcher")
    parts.runs.metrics.watch_queues(parts.runs.queues)
    if config.metrics_port:
        try:
            parts.runs.metrics.serve(config.metrics_port)
        except OSError as exc:
            log.error(
                "operator metrics off: cannot listen on port %s: %s", config.metrics_port, exc
            )
        else:
            log.info("operator metrics on :%s/metrics", config.metrics_port)
    api = config.metrics_api
    if api is None:
        log.error("metrics API off: %s", config.metrics_api_error)
        return
    server: MetricsApiServer | None = None
    if api.port is None:
        log.info("metrics API off (port 0): HPAs of ScalingPolicies get no Shoal metrics")
    else:
        local = api.register == "local"
        hosts = ["localhost", "127.0.0.1"]
        if own_ns:
            hosts += [f"{api.service}.{own_ns}.svc", f"{api.service}.{own_ns}.svc.cluster.local"]
        # An operator outside the cluster is reached through localhost: nothing else
        # needs to reach it, and what is not exposed needs no authentication.
        server = MetricsApiServer(metrics, api, "127.0.0.1" if local else "0.0.0.0", hosts)
        try:
            await server.start()
        except OSError as exc:
            log.error("metrics API off: cannot listen on port %s: %s", api.port, exc)
            server = None
        else:
            parts.metrics_api = server
    if not own_ns:
        log.warning("SHOAL_OPERATOR_NAMESPACE is not set: the APIService is not checked")
        return
    # Without a server nothing is registered, but whose APIService it is still shows on
    # the policies (another provider's, typically, when the metrics API is turned off).
    if server is None:
        api = replace(api, register="none")
    parts.registration = Registration(
        parts.kube, api, own_ns, server.port if server else 0, parts.triggers.on_metrics_provider
    )
    parts._registration_task = asyncio.create_task(
        parts.registration.run(), name="shoal-apiservice"
    )


async def stop(parts: Running) -> None:
    for task in parts.tasks:
        task.cancel()
    parts.tasks.clear()
    if parts._registration_task is not None:
        parts._registration_task.cancel()
        await asyncio.gather(parts._registration_task, return_exceptions=True)
    if parts.registration is not None:
        try:
            await parts.registration.unregister()
        except Exception as exc:
            log.warning("metrics API: could not remove the APIService: %s", exc)
    if parts.metrics_api is not None:
        await parts.metrics_api.stop()
    await parts.controller.stop()
    await parts.autoscale.stop()
    if parts.charge.leader is not None:
        await parts.charge.leader.release()
    if parts.heartbeat is not None:
        await parts.kube.delete("Lease", parts.heartbeat.namespace, parts.heartbeat.name)
    if parts.link.admin is not None:
        await parts.link.admin.close()
    await parts.kube.close()


class Operator:
    """One operator, as kopf drives it: started with the watch cache, stopped at exit.

    ``configure`` is called at each start: ``python -m shoal_operator`` passes the
    configuration it parsed; ``kopf run`` (tests) reads the environment then.
    """

    def __init__(self, configure: Callable[[], OperatorConfig]) -> None:
        self.configure = configure
        self.running: Running | None = None
        """The parts while the operator runs; None before start-up and after clean-up."""

    async def start(self, indexes: Indexes) -> None:
        config = self.configure()
        kube = await Kube.connect(config.instance or None)
        parts = assemble(config, kube, indexes)
        self.running = parts
        await start(parts)

    async def stop(self) -> None:
        parts, self.running = self.running, None
        if parts is not None:
            await stop(parts)

    def probe(self) -> str:
        """The watch liveness: fails when the heartbeat Lease stops coming back."""
        hb = self.running.heartbeat if self.running is not None else None
        if hb is None:
            return "no heartbeat configured"
        stalled = hb.stalled_for(time.monotonic())
        if stalled is not None:
            raise RuntimeError(f"no watch event for {stalled:.0f}s: watching has stalled")
        return "ok"

    def saw_heartbeat(self, name: str) -> None:
        hb = self.running.heartbeat if self.running is not None else None
        if hb is not None and name == hb.name:
            hb.seen()
