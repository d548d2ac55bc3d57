"""kopf glue: watches fill the cache (indexes) and queue keys; nothing else happens here.

kopf guarantees every index is populated from the initial listing before any other
handler runs, so the first reconcile already sees every Agent, policy and child.
Handlers are registered on a registry given by the composition root, and reach the
running operator through the :class:`~shoal_operator.app.Operator` it hands in: there is
no module state, so two registries (two tests, say) never share an operator.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from shoal_api.base import GROUP, VERSION
from shoal_operator.app import Operator
from shoal_operator.builders.common import AGENT_LABEL, MANAGED_BY, POLICY_LABEL
from shoal_operator.cache import Indexes
from shoal_operator.clients.health import HEARTBEAT_LABEL
from shoal_operator.settings import FIELD_MANAGER, HANDOVER_MANAGER

CHILD_LABELS = dict(MANAGED_BY)
INDEXES = (
    "shoal_agents",
    "shoal_policies",
    "shoal_workflows",
    "shoal_deployments",
    "shoal_hpas",
    "shoal_agents_by_ns",
    "shoal_agents_by_reference",
    "shoal_policies_by_target",
    "shoal_workflows_by_ns",
)
"""The index ids, in the order of :class:`~shoal_operator.cache.Indexes`' fields."""


def configure(settings: kopf.OperatorSettings) -> None:
    """The kopf settings every deployment of Shoal runs with."""
    # Watches can stall silently: bound them on both sides so the stream is re-opened,
    # and re-list when a stream has been silent for longer than the server timeout.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.watching.inactivity_timeout = 600
    settings.networking.request_timeout = 30
    # An Event per INFO log line floods the API server; the controller posts the
    # Events that matter (transitions) itself.
    settings.posting.level = logging.WARNING


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


def register(registry: kopf.OperatorRegistry, operator: Operator) -> None:
    """Registers the watch cache, the lifecycle and the triggers of ``operator``.

    Handlers are coroutines: kopf runs sync handlers in a thread pool, a thread hop per
    watch event that costs CPU and memory (an allocator arena per thread) at scale.
    """
    _register_cache(registry)

    @kopf.on.login(id="_login", registry=registry)
    def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # kopf's default login goes through kubernetes_asyncio when it is installed (a dev
        # environment), which reads the KUBECONFIG captured when first imported; these
        # read the environment now, where clients.kube looks too.
        info: kopf.ConnectionInfo | None = kopf.login_with_service_account(
            **kwargs
        ) or kopf.login_with_kubeconfig(**kwargs)
        return info

    @kopf.on.startup(id="_startup", registry=registry)
    async def _startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        configure(settings)
        await operator.start(Indexes(*(kwargs[name] for name in INDEXES)))

    @kopf.on.cleanup(id="_cleanup", registry=registry)
    async def _cleanup(**_: Any) -> None:
        await operator.stop()

    @kopf.on.probe(id="watch", registry=registry)
    async def _watch_probe(**_: Any) -> str:
        """Fails the liveness endpoint when the heartbeat Lease stops coming back."""
        return operator.probe()

    @kopf.on.event(GROUP, VERSION, "agents", id="_agent_event", registry=registry)
    async def _agent_event(
        *, namespace: str | None, name: str, type: str, body: kopf.Body, **_: Any
    ) -> None:
        if (run := operator.running) is not None:
            run.triggers.on_agent(_ns(namespace), name, None if type == "DELETED" else body)

    @kopf.on.event(GROUP, VERSION, "scalingpolicies", id="_policy_event", registry=registry)
    async def _policy_event(
        *, namespace: str | None, name: str, type: str, body: kopf.Body, **_: Any
    ) -> None:
        if (run := operator.running) is not None:
            run.triggers.on_policy(_ns(namespace), name, None if type == "DELETED" else body)

    @kopf.on.event(GROUP, VERSION, "workflows", id="_workflow_event", registry=registry)
    async def _workflow_event(
        *, namespace: str | None, name: str, type: str, body: kopf.Body, **_: Any
    ) -> None:
        if (run := operator.running) is not None:
            run.triggers.on_workflow_event(
                _ns(namespace), name, None if type == "DELETED" else body
            )

    @kopf.on.event(GROUP, VERSION, "approvals", id="_approval_event", registry=registry)
    async def _approval_event(
        *, namespace: str | None, name: str, type: str, body: kopf.Body, **_: Any
    ) -> None:
        # An event handler, not on.create/on.resume: those keep their progress in
        # annotations on the object, and the operator may only write an Approval's
        # status. The initial listing plays the part of resume; the status phase says
        # what is done.
        if (run := operator.running) is not None:
            await run.relay.on_approval(_ns(namespace), name, None if type == "DELETED" else body)

    @kopf.on.event(
        "apps", "v1", "deployments", labels=CHILD_LABELS, id="_deployment_event", registry=registry
    )
    async def _deployment_event(*, namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
        if (run := operator.running) is not None and (agent := labels.get(AGENT_LABEL)):
            run.triggers.on_deployment(_ns(namespace), agent)

    @kopf.on.event(
        "autoscaling",
        "v2",
        "horizontalpodautoscalers",
        labels=CHILD_LABELS,
        id="_hpa_event",
        registry=registry,
    )
    async def _hpa_event(*, namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
        if (run := operator.running) is not None and (policy := labels.get(POLICY_LABEL)):
            run.triggers.on_hpa(_ns(namespace), policy)

    @kopf.on.event(
        "coordination.k8s.io",
        "v1",
        "leases",
        labels={HEARTBEAT_LABEL: "true"},
        id="_heartbeat_event",
        registry=registry,
    )
    async def _heartbeat_event(*, name: str, **_: Any) -> None:
        operator.saw_heartbeat(name)


def _register_cache(registry: kopf.OperatorRegistry) -> None:
    """The indexes; their ids are the keyword names kopf hands them to handlers by."""

    @kopf.index(GROUP, VERSION, "agents", id="shoal_agents", registry=registry)
    async def agents(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
        return {(_ns(namespace), name): _entry(body)}

    @kopf.index(GROUP, VERSION, "agents", id="shoal_agents_by_reference", registry=registry)
    async def agents_by_reference(
        *, namespace: str | None, name: str, spec: kopf.Spec, **_: Any
    ) -> Any:
        """(namespace, Agent) -> the Agents that name it as fallback or escalation."""
        refs = {(spec.get(k) or {}).get("agent") for k in ("fallback", "escalation")} - {None}
        return {(_ns(namespace), ref): name for ref in refs} or None

    @kopf.index(GROUP, VERSION, "agents", id="shoal_agents_by_ns", registry=registry)
    async def agents_by_ns(*, namespace: str | None, name: str, **_: Any) -> Any:
        return {_ns(namespace): name}

    @kopf.index(GROUP, VERSION, "scalingpolicies", id="shoal_policies", registry=registry)
    async def policies(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
        return {(_ns(namespace), name): _entry(body)}

    @kopf.index(GROUP, VERSION, "scalingpolicies", id="shoal_policies_by_target", registry=registry)
    async def policies_by_target(
        *, namespace: str | None, name: str, spec: kopf.Spec, **_: Any
    ) -> Any:
        target = (spec.get("targetRef") or {}).get("name")
        return {(_ns(namespace), target): name} if target else None

    @kopf.index(GROUP, VERSION, "workflows", id="shoal_workflows", registry=registry)
    async def workflows(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
        return {(_ns(namespace), name): _entry(body)}

    @kopf.index(GROUP, VERSION, "workflows", id="shoal_workflows_by_ns", registry=registry)
    async def workflows_by_ns(*, namespace: str | None, name: str, **_: Any) -> Any:
        return {_ns(namespace): name}

    @kopf.index(
        "apps", "v1", "deployments", labels=CHILD_LABELS, id="shoal_deployments", registry=registry
    )
    async def deployments(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
        return {(_ns(namespace), name): _child_entry(body)}

    @kopf.index(
        "autoscaling",
        "v2",
        "horizontalpodautoscalers",
        labels=CHILD_LABELS,
        id="shoal_hpas",
        registry=registry,
    )
    async def hpas(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
        return {(_ns(namespace), name): _entry(body, spec=False)}
