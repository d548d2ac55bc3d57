"""JSON Schema checks shared by the runtime (Agent contracts) and the dispatcher (a
Workflow's ``spec.input``): one way to compile a schema and one way to word a violation."""

from __future__ import annotations

from typing import Any

import jsonschema


def validator(schema: Any) -> jsonschema.protocols.Validator | None:
    """A validator for ``schema`` (None: no schema, anything goes). Raises
    ``jsonschema.exceptions.SchemaError`` for a schema that is not one."""
    if schema is None:
        return None
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def violation(validator: jsonschema.protocols.Validator | None, value: Any) -> str | None:
    """Why ``value`` does not satisfy the schema, as ``path: message``, or None."""
    if validator is None:
        return None
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


def schema_error(schema: Any) -> str | None:
    """Why ``schema`` is not a JSON Schema (``at <path>: <message>``), or None."""
    try:
        validator(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return f"at {where}: {exc.message}"
    return None
