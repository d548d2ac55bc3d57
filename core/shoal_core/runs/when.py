"""A step's ``when``: a CEL condition over ``input``, ``steps`` and ``context``.

CEL because users already write it in Kubernetes validation rules, and because it cannot
loop, do I/O or reach Python objects: a Workflow author cannot make the dispatcher do
more than compare values.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.celtypes import BoolType
from celpy.evaluation import CELEvalError

_CACHE_SIZE = 1024


class WhenError(ValueError):
    """A ``when`` that does not compile, fails to evaluate, or is not a bool."""


@functools.cache
def _environment() -> celpy.Environment:
    # Built on first use, not at import: celpy.Environment() raises the process's recursion
    # limit to 2500. That stays, deliberately: its evaluator recurses per operator, and under
    # the default limit of 1000 a chain of 200 `&&` terms (within the 4096 characters a
    # `when` may have) or 24 nested parentheses already fails.
    return celpy.Environment()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _program(expr: str) -> celpy.Runner:
    # Parsing dominates the cost of a condition, and a Workflow's conditions repeat in
    # every run; compile errors are not cached, they stay rare and cheap to repeat.
    env = _environment()
    try:
        return env.program(env.compile(expr))
    except CELParseError as exc:
        where = f"line {exc.line}, column {exc.column}: " if exc.line is not None else ""
        pointer = str(exc.args[0]).rstrip("\n") if exc.args else ""
        raise WhenError(f"invalid CEL in when: {where}syntax error\n{pointer}") from None
    except RecursionError:
        raise WhenError("invalid CEL in when: expression nested too deeply") from None


def compile_when(expr: str) -> str | None:
    """Why ``expr`` is not a valid ``when`` (for the operator's Ready condition), or None.

    Only syntax is checked: names and types depend on a run's data."""
    if not expr.strip():
        return None
    try:
        _program(expr)
    except WhenError as exc:
        return str(exc)
    return None


def evaluate_when(
    expr: str,
    *,
    input: Any,
    steps: Mapping[str, Mapping[str, Any]],
    context: Mapping[str, Any],
) -> bool:
    """Whether the step runs: an empty ``when`` is true; ``steps`` maps a step name to
    ``{"output": ..., "phase": ...}``."""
    if not expr.strip():
        return True
    program = _program(expr)
    activation = {
        "input": json_to_cel(input),
        "steps": json_to_cel({name: dict(s) for name, s in steps.items()}),
        "context": json_to_cel(dict(context)),
    }
    try:
        result = program.evaluate(activation)
    except CELEvalError as exc:
        raise WhenError(f"when {expr!r} failed: {_eval_message(exc)}") from None
    except (RecursionError, ValueError, TypeError, ArithmeticError, LookupError) as exc:
        raise WhenError(f"when {expr!r} failed: {exc}") from None
    if not isinstance(result, BoolType):
        raise WhenError(f"when {expr!r} is not a condition: it gave {result!r}, not a bool")
    return bool(result)


def _eval_message(exc: CELEvalError) -> str:
    message = str(exc.args[0]) if exc.args else str(exc)
    # An undeclared name comes with a dump of the whole activation: keep the first clause.
    return message.split(" (in activation", 1)[0]
