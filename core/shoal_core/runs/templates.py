"""``${...}`` templates of step inputs and run outputs.

A string that is exactly one ``${path}`` becomes the value at ``path`` with its JSON type
intact, so ``{"items": "${steps.fetch.output.items}"}`` passes a list, not its text. A
``${path}`` inside longer text is interpolated: strings as they are, anything else as
compact JSON. Paths are deliberately not expressions (that is what ``when`` is for):
dotted keys with ``[n]`` list indexes, nothing to evaluate, nothing to sandbox.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

_TEMPLATE = re.compile(r"\$\{([^}]*)\}")
# Keys may hold hyphens because step names are DNS labels (steps.check-id.output).
_KEY = r"[A-Za-z_][A-Za-z0-9_-]*"
_PATH = re.compile(rf"{_KEY}(?:\.{_KEY}|\[[0-9]+\])*")
_SEGMENT = re.compile(rf"\.?({_KEY})|\[([0-9]+)\]")


class TemplateError(ValueError):
    """A template that cannot be rendered; the message names the expression."""


def render(template: Any, scope: Mapping[str, Any]) -> Any:
    """``template`` with every ``${path}`` replaced from ``scope`` (a fresh value: the caller
    may hand it on without aliasing the run state it came from)."""
    if isinstance(template, str):
        return _render_str(template, scope)
    if isinstance(template, Mapping):
        return {k: render(v, scope) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return [render(v, scope) for v in template]
    return template


def lookup(path: str, scope: Mapping[str, Any]) -> Any:
    """The value at a dotted ``path`` such as ``steps.classify.output.labels[0]``."""
    path = path.strip()
    if not _PATH.fullmatch(path):
        raise TemplateError(
            f"${{{path}}} is not a path (expected names joined by dots, with optional [n])"
        )
    value: Any = scope
    walked = ""
    for match in _SEGMENT.finditer(path):
        key, index = match.group(1), match.group(2)
        if key is not None:
            if not isinstance(value, Mapping) or key not in value:
                raise TemplateError(f"${{{path}}}: {_where(walked)} has no key {key!r}")
            value = value[key]
            walked = f"{walked}.{key}" if walked else key
        else:
            n = int(index)
            if not isinstance(value, list | tuple):
                raise TemplateError(f"${{{path}}}: {_where(walked)} is not a list")
            if n >= len(value):
                raise TemplateError(
                    f"${{{path}}}: {_where(walked)} has {len(value)} items, no [{n}]"
                )
            value = value[n]
            walked = f"{walked}[{n}]"
    return value


def _where(walked: str) -> str:
    return walked or "the scope"


def _render_str(text: str, scope: Mapping[str, Any]) -> Any:
    whole = _TEMPLATE.fullmatch(text)
    if whole is not None:
        return copy.deepcopy(lookup(whole.group(1), scope))
    return _TEMPLATE.sub(lambda m: _as_text(lookup(m.group(1), scope)), text)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
