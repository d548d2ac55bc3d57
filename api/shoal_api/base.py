"""Shared building blocks of the Shoal API models.

The models here are the one source of truth for the custom resources: they parse
specs in the operator and the runtime, apply defaults, and generate the CRD schemas
in ``crds/`` (see :mod:`shoal_api.crd`).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

GROUP = "shoal.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class ApiModel(BaseModel):
    """Base of every spec/status struct: camelCase on the wire, unknown fields rejected.

    Attribute docstrings become field descriptions, so ``kubectl explain`` shows the
    same text a reader of this code sees.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict an API server or NATS message carries (unset fields omitted)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def status_patch(status: ApiModel) -> dict[str, Any]:
    """The merge patch that writes ``status`` to the status subresource.

    The one way a status model becomes bytes on the API server: camelCase, a field that
    is None left out (a merge patch keeps what it does not name, which is how a status
    says "no news, keep the last mirrored value"), keys sorted, so that computing the
    same status twice gives equal patches and nothing is written twice.
    """
    return {"status": _sorted(status.to_wire())}


def cel(
    rule: str,
    message: str | None = None,
    *,
    message_expression: str | None = None,
    field_path: str | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry: a CEL rule the API server checks at apply."""
    out = {"rule": rule}
    if message is not None:
        out["message"] = message
    if message_expression is not None:
        out["messageExpression"] = message_expression
    if field_path is not None:
        out["fieldPath"] = field_path
    if reason is not None:
        out["reason"] = reason
    return out


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules for a model or field."""
    return {"x-kubernetes-validations": list(rules)}


def list_map(*keys: str) -> dict[str, Any]:
    """Schema extra for a list merged by key (server-side apply, duplicate detection)."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


LIST_SET: dict[str, Any] = {"x-kubernetes-list-type": "set"}

_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?$")


def _decimal(value: object) -> object:
    # Money travels as a string ("5.00") so no float rounding creeps in; numbers
    # written unquoted in Python code are accepted too.
    if isinstance(value, int | float):
        return Decimal(str(value))
    if isinstance(value, str) and not _DECIMAL.match(value):
        raise ValueError(f'{value!r} is not a non-negative decimal such as "5.00"')
    return value


Money = Annotated[
    Decimal,
    BeforeValidator(_decimal),
    PlainSerializer(lambda d: format(d, "f"), return_type=str),
    WithJsonSchema({"type": "string", "pattern": _DECIMAL.pattern, "maxLength": 32}),
]
"""A non-negative decimal amount in the provider's currency, written as a string."""

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
"""The name of a Kubernetes object or step (DNS label)."""

Percent = Annotated[int, Field(ge=0, le=100)]

JsonObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""A free-form object (a JSON Schema, a template, an embedded Kubernetes struct)."""

IntOrString = Annotated[
    int | str,
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]


def unless_known(schema: dict[str, Any]) -> Any:
    """A status field the operator writes only once it knows a value: None in the
    model means "not known, keep what the status shows" (:func:`status_patch` leaves
    it out), so the schema is the value's alone (a status never holds null)."""
    return WithJsonSchema(schema)


OptionalTime = Annotated[str | None, unless_known({"type": "string"})]
"""An RFC 3339 time, written once known."""


class Condition(ApiModel):
    """A status condition in the shape of metav1.Condition."""

    type: Annotated[str, Field(max_length=316)]
    """Type of condition: Ready, Progressing, Degraded (Active for ScalingPolicy)."""
    status: Literal["True", "False", "Unknown"]
    """Status of the condition: True, False or Unknown."""
    reason: Annotated[str, Field(max_length=1024)] = ""
    """A CamelCase word saying why the condition last changed."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """A sentence for humans about the last transition."""
    observed_generation: Annotated[int, Field(ge=0)] = 0
    """The .metadata.generation this condition was computed from."""
    last_transition_time: str = ""
    """When the status last flipped (RFC 3339)."""


Conditions = Annotated[
    tuple[Condition, ...],
    Field(json_schema_extra=list_map("type")),
]


class ObjectStatus(ApiModel):
    """The part every Shoal status shares: what an object whose spec cannot be parsed
    still reports (its other status fields stay as they were)."""

    observed_generation: Annotated[int, Field(ge=0)] = 0
    """The .metadata.generation the operator last acted on."""
    conditions: Conditions = ()
    """Ready and Degraded (and the kind's own)."""


class SecretKeyRef(ApiModel):
    """A key of a Secret in the same namespace."""

    name: Name
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253)]
    """Key inside the Secret's data."""


class AgentRef(ApiModel):
    """A reference to another Agent in the same namespace."""

    agent: Name
    """Name of the Agent."""
