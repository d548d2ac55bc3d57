"""${...} templates of step inputs and run outputs."""

from __future__ import annotations

from typing import Any

import pytest

from shoal_core.runs.templates import TemplateError, lookup, render

SCOPE: dict[str, Any] = {
    "input": {"customerId": "c-42", "message": "hi", "count": 3, "tags": ["a", "b"]},
    "steps": {
        "classify": {"output": {"category": "billing", "score": 0.9, "labels": ["x", "y"]}},
        "check-id": {"output": {"ok": True, "nested": [{"k": [10, 20]}]}},
        "skipped": {"output": None},
    },
    "context": {"tenant": "acme"},
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${input.count}", 3),
        ("${steps.classify.output.score}", 0.9),
        ("${steps.check-id.output.ok}", True),
        ("${steps.skipped.output}", None),
        ("${input.tags}", ["a", "b"]),
        ("${steps.classify.output}", {"category": "billing", "score": 0.9, "labels": ["x", "y"]}),
        ("${ input.count }", 3),
    ],
)
def test_a_whole_string_template_keeps_the_value_s_type(template: str, expected: Any) -> None:
    assert render(template, SCOPE) == expected


def test_interpolation_inside_text() -> None:
    assert (
        render("customer ${input.customerId} said ${input.message}", SCOPE)
        == "customer c-42 said hi"
    )


def test_non_strings_are_interpolated_as_compact_json() -> None:
    text = (
        "n=${input.count} ok=${steps.check-id.output.ok} tags=${input.tags}"
        " none=${steps.skipped.output}"
    )
    assert render(text, SCOPE) == 'n=3 ok=true tags=["a","b"] none=null'


def test_two_templates_side_by_side_interpolate() -> None:
    assert render("${input.customerId}${input.count}", SCOPE) == "c-423"


def test_indexes() -> None:
    assert render("${steps.classify.output.labels[1]}", SCOPE) == "y"
    assert render("${steps.check-id.output.nested[0].k[1]}", SCOPE) == 20
    assert render("first: ${input.tags[0]}", SCOPE) == "first: a"


def test_dicts_and_lists_recurse_and_other_values_pass_through() -> None:
    template = {
        "text": "${input.message}",
        "meta": {"tenant": "${context.tenant}", "n": 7, "flag": False, "nothing": None},
        "list": ["${input.count}", "plain", 1.5],
    }
    assert render(template, SCOPE) == {
        "text": "hi",
        "meta": {"tenant": "acme", "n": 7, "flag": False, "nothing": None},
        "list": [3, "plain", 1.5],
    }


def test_text_without_templates_is_left_alone() -> None:
    assert render("cost is $5 {not a template}", SCOPE) == "cost is $5 {not a template}"


def test_rendered_values_do_not_alias_the_scope() -> None:
    out = render({"t": "${input.tags}"}, SCOPE)
    out["t"].append("c")
    assert SCOPE["input"]["tags"] == ["a", "b"]


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("${input.missing}", "${input.missing}: input has no key 'missing'"),
        ("${steps.nope.output}", "${steps.nope.output}: steps has no key 'nope'"),
        ("${secrets.x}", "the scope has no key 'secrets'"),
        ("${input.tags[2]}", "input.tags has 2 items, no [2]"),
        ("${input.count[0]}", "input.count is not a list"),
        ("${input.count.x}", "input.count has no key 'x'"),
        ("${steps.skipped.output.category}", "steps.skipped.output has no key 'category'"),
        ("x ${input.missing} y", "${input.missing}"),
        ("${input.}", "is not a path"),
        ("${}", "is not a path"),
        ("${input[0]x}", "is not a path"),
    ],
)
def test_a_missing_path_names_it(template: str, named: str) -> None:
    with pytest.raises(TemplateError) as err:
        render({"deep": [template]}, SCOPE)
    assert named in str(err.value)


def test_lookup_walks_keys_and_indexes() -> None:
    assert lookup("steps.check-id.output.nested[0].k", SCOPE) == [10, 20]
