"""The watch cache: kopf's indexes, and the questions the operator asks of them.

Every reconcile reads the cluster from here, never from the API server: kopf fills the
indexes from the watches before any handler runs, so the cache is complete from the
first reconcile, and reading it costs no round trip. Specs that are parsed on every
question (the autoscaler asks each second) are parsed once per generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from shoal_api.scaling import ScalingPolicySpec

Key = tuple[str, str, str]
"""(kind, namespace, name): what the work queue holds."""
KINDS = ("Agent", "ScalingPolicy", "Workflow")


class Index(Protocol):
    """What we use of a kopf.Index: key -> a collection of stored values."""

    def get(self, key: Any, default: Any = None) -> Any: ...

    def __iter__(self) -> Any: ...


@dataclass
class Indexes:
    """kopf's indexes, as the glue registers them."""

    agents: Index
    policies: Index
    workflows: Index
    deployments: Index
    hpas: Index
    agents_by_ns: Index
    agents_by_reference: Index
    policies_by_target: Index
    workflows_by_ns: Index

    @staticmethod
    def one(index: Index, key: Any) -> dict[str, Any] | None:
        store = index.get(key)
        if not store:
            return None
        value: dict[str, Any] = next(iter(store))
        return value

    @staticmethod
    def names(index: Index, key: Any) -> list[str]:
        return sorted(set(index.get(key) or ()))


@dataclass
class Cache:
    """The watch cache, as the reconcile I/O, the triggers and the catalog ask it.

    ``indexes`` is None until kopf hands them over at start-up: until then nothing is
    watched, so nothing depends on anything and every runtime record counts as ours.
    """

    indexes: Indexes | None = None
    _policy_specs: dict[tuple[str, str], tuple[Any, ScalingPolicySpec]] = field(
        default_factory=dict
    )

    def _idx(self) -> Indexes:
        if self.indexes is None:
            raise RuntimeError("reconcile before the watch cache exists")
        return self.indexes

    # -- objects ------------------------------------------------------------------

    def agent(self, namespace: str, name: str) -> dict[str, Any] | None:
        return Indexes.one(self._idx().agents, (namespace, name))

    def policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        return Indexes.one(self._idx().policies, (namespace, name))

    def workflow(self, namespace: str, name: str) -> dict[str, Any] | None:
        return Indexes.one(self._idx().workflows, (namespace, name))

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return Indexes.one(self._idx().deployments, (namespace, name))

    def hpa(self, namespace: str, name: str) -> dict[str, Any] | None:
        return Indexes.one(self._idx().hpas, (namespace, name))

    def all_keys(self) -> list[Key]:
        """Every watched Agent, ScalingPolicy and Workflow."""
        if self.indexes is None:
            return []
        idx = self.indexes
        return [
            (kind, ns, name)
            for kind, index in zip(KINDS, (idx.agents, idx.policies, idx.workflows), strict=True)
            for ns, name in list(index)
        ]

    def policies(self) -> list[tuple[str, str]]:
        return [] if self.indexes is None else list(self.indexes.policies)

    # -- relations ------------------------------------------------------------------

    def agents(self, namespace: str) -> frozenset[str]:
        """Names of the Agents in ``namespace``."""
        return frozenset(Indexes.names(self._idx().agents_by_ns, namespace))

    def watches_agent(self, namespace: str, agent: str) -> bool:
        """Whether ``agent`` is watched (the runtime buckets hold every namespace's)."""
        return self.indexes is None or bool(self.indexes.agents.get((namespace, agent)))

    def referring_agents(self, namespace: str, agent: str) -> list[str]:
        """The Agents naming ``agent`` as fallback or escalation."""
        if self.indexes is None:
            return []
        return Indexes.names(self.indexes.agents_by_reference, (namespace, agent))

    def policies_targeting(self, namespace: str, agent: str) -> list[str]:
        if self.indexes is None:
            return []
        return Indexes.names(self.indexes.policies_by_target, (namespace, agent))

    def workflows_in(self, namespace: str) -> list[str]:
        if self.indexes is None:
            return []
        return Indexes.names(self.indexes.workflows_by_ns, namespace)

    def capabilities(self, namespace: str) -> dict[str, frozenset[str]]:
        """Agent -> its declared capabilities, for every Agent of ``namespace``."""
        out = {}
        for agent in self.agents(namespace):
            body = self.agent(namespace, agent) or {}
            out[agent] = frozenset(body.get("spec", {}).get("capabilities", []))
        return out

    def scaling_policy_for(self, namespace: str, agent: str) -> tuple[str, int] | None:
        """The policy that scales ``agent`` (first by name) and its maxReplicas."""
        for policy in self.policies_targeting(namespace, agent):
            body = self.policy(namespace, policy)
            if body and not body["metadata"].get("deletionTimestamp"):
                try:
                    spec = ScalingPolicySpec.model_validate(body["spec"])
                except ValidationError:
                    continue
                return policy, spec.max_replicas
        return None

    def policy_spec(
        self, namespace: str, name: str, body: Mapping[str, Any]
    ) -> ScalingPolicySpec | None:
        """Parsed once per generation; None if invalid (the reconcile reports it)."""
        generation = body["metadata"].get("generation")
        cached = self._policy_specs.get((namespace, name))
        if cached is not None and cached[0] == generation:
            return cached[1]
        try:
            spec = ScalingPolicySpec.model_validate(body.get("spec", {}))
        except ValidationError:
            return None
        self._policy_specs[(namespace, name)] = (generation, spec)
        return spec
