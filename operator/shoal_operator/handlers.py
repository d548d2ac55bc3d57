"""kopf glue: every event of a Shoal resource runs the same level-triggered reconcile."""

from __future__ import annotations

import datetime as dt
from typing import Any

import kopf
from pydantic import ValidationError

from shoal_api.agent import AgentSpec
from shoal_api.base import GROUP, VERSION, ApiModel
from shoal_api.scaling import ScalingPolicySpec
from shoal_api.workflow import WorkflowSpec
from shoal_operator.conditions import Cond, merge_conditions
from shoal_operator.settings import configure

SPECS: dict[str, type[ApiModel]] = {
    "agents": AgentSpec,
    "scalingpolicies": ScalingPolicySpec,
    "workflows": WorkflowSpec,
}


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure(settings)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validation_message(exc: ValidationError) -> str:
    """A one-line summary of a pydantic error naming the offending fields."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"spec.{where}: {err['msg']}")
    return "; ".join(parts)


def reconcile_spec(
    plural: str, spec: dict[str, Any], status: dict[str, Any], generation: int, now: str
) -> dict[str, Any]:
    """Status patch for a spec: parsed by the models, or Degraded with the reason."""
    try:
        SPECS[plural].model_validate(spec)
    except ValidationError as exc:
        desired = [
            Cond("Ready", "False", "InvalidSpec", validation_message(exc)),
            Cond("Degraded", "True", "InvalidSpec", validation_message(exc)),
        ]
    else:
        desired = [Cond("Degraded", "False", "SpecValid", "")]
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(status.get("conditions"), desired, generation, now),
    }


def _register(plural: str) -> None:
    @kopf.on.resume(GROUP, VERSION, plural)
    @kopf.on.create(GROUP, VERSION, plural)
    @kopf.on.update(GROUP, VERSION, plural)
    def _reconcile(
        spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, patch: kopf.Patch, **_: Any
    ) -> None:
        new = reconcile_spec(plural, dict(spec), dict(status), int(meta["generation"]), _now())
        if {k: status.get(k) for k in new} != new:
            patch.status.update(new)


for _plural in SPECS:
    _register(_plural)
