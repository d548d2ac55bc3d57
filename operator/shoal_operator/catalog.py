"""The workflow run dispatcher's catalog, answered from the watch cache.

The dispatcher asks which Workflow a run belongs to and which Agents can take a step,
thousands of times a second under load; the answers come from the cache (no API
round trip), and a Workflow is parsed once per generation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from shoal_api.workflow import WorkflowSpec
from shoal_operator.cache import Cache
from shoal_operator.runs import WorkflowView, view_of
from shoal_operator.writer import validation_message

log = logging.getLogger(__name__)


@dataclass
class WatchCatalog:
    """Implements the dispatcher's ``Catalog``."""

    cache: Cache
    _views: dict[tuple[str, str], tuple[Any, WorkflowView]] = field(default_factory=dict)

    def workflow(self, namespace: str, name: str) -> WorkflowView | None:
        body = self.cache.workflow(namespace, name)
        if body is None:
            return None
        generation = body["metadata"].get("generation")
        cached = self._views.get((namespace, name))
        if cached is not None and cached[0] == generation:
            return cached[1]
        try:
            spec = WorkflowSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            log.warning("workflow %s/%s unusable: %s", namespace, name, validation_message(exc))
            return None
        view = view_of(spec)
        self._views[(namespace, name)] = (generation, view)
        return view

    def capable(self, namespace: str, capability: str) -> list[str]:
        """The Agents of ``namespace`` declaring ``capability``, sorted."""
        return sorted(
            agent
            for agent, caps in self.cache.capabilities(namespace).items()
            if capability in caps
        )
