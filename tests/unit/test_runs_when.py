"""A step's CEL ``when``."""

from __future__ import annotations

from typing import Any

import pytest

from shoal_core.runs.when import WhenError, compile_when, evaluate_when

STEPS: dict[str, dict[str, Any]] = {
    "classify": {"output": {"category": "spam", "score": 0.75}, "phase": "Succeeded"},
    "enrich": {"output": None, "phase": "Skipped"},
}


def when(expr: str, **data: Any) -> bool:
    return evaluate_when(
        expr,
        input=data.get("input", {"tier": "gold", "amount": 120}),
        steps=data.get("steps", STEPS),
        context=data.get("context", {"region": "eu"}),
    )


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("", True),
        ("   ", True),
        ("true", True),
        ("false", False),
        ("input.tier == 'gold'", True),
        ("input.amount > 100 && input.tier != 'gold'", False),
        ("steps.classify.output.category != 'spam'", False),
        ("steps.classify.output.category == 'spam'", True),
        ("steps.classify.output.score >= 0.5", True),
        ("steps.enrich.phase == 'Skipped'", True),
        ("steps.enrich.output == null", True),
        ("has(steps.classify.output.category)", True),
        ("'enrich' in steps", True),
        ("context.region == 'eu'", True),
    ],
)
def test_true_and_false(expr: str, expected: bool) -> None:
    assert when(expr) is expected


def test_uses_step_outputs() -> None:
    ham = {"classify": {"output": {"category": "billing"}, "phase": "Succeeded"}}
    assert when("steps.classify.output.category != 'spam'", steps=ham) is True
    assert when("steps.classify.output.category != 'spam'") is False


def test_compile_error_message_points_at_the_column() -> None:
    problem = compile_when("steps.classify.output.category ==")
    assert problem is not None
    assert problem.startswith("invalid CEL in when: line 1, column")
    assert "syntax error" in problem
    assert "^" in problem
    with pytest.raises(WhenError, match="invalid CEL in when"):
        when("steps.classify.output.category ==")


def test_compile_when_accepts_valid_and_empty_conditions() -> None:
    assert compile_when("steps.classify.output.category != 'spam'") is None
    assert compile_when("") is None


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("steps.ghost.output.x == 1", "no such member in mapping: 'ghost'"),
        ("secret == 1", "undeclared reference to 'secret'"),
        ("input.amount / 0 == 1", "divide by zero"),
        ("input.tier + 1 == 2", "no matching overload"),
    ],
)
def test_evaluation_errors_are_when_errors(expr: str, message: str) -> None:
    with pytest.raises(WhenError) as err:
        when(expr)
    assert message in str(err.value)
    assert expr in str(err.value)
    assert "activation" not in str(err.value)  # no dump of the whole activation


def test_a_non_bool_result_is_an_error() -> None:
    with pytest.raises(WhenError, match="not a bool"):
        when("input.amount")


def test_compiled_programs_are_cached() -> None:
    from shoal_core.runs import when as conditions

    conditions._program.cache_clear()
    for _ in range(3):
        when("input.amount > 1")
    info = conditions._program.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_long_conditions_evaluate_and_absurd_nesting_is_an_error_not_a_crash() -> None:
    assert when(" && ".join(["input.amount > 1"] * 250)) is True
    with pytest.raises(WhenError, match="recursion"):
        when("(" * 200 + "true" + ")" * 200)
