"""Workflow runs, as a pure state machine.

The operator's dispatcher keeps each run in one NATS KV record and feeds it events;
everything here is free of I/O and clocks, so a run replays identically:

- :mod:`~shoal_api.runs.model` (in shoal-api): the run record, its events and the effects
  it asks for.
- :mod:`~shoal_core.runs.engine`: :func:`~shoal_core.runs.engine.advance`, the transition.
- :mod:`~shoal_core.runs.templates`: ``${input.x}`` / ``${steps.NAME.output.y}`` rendering.
- :mod:`~shoal_core.runs.when`: a step's CEL ``when``.
- :mod:`~shoal_core.runs.selection`: which Agent serves a step that names a capability.
"""
