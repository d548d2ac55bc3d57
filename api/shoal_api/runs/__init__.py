"""The contract of a workflow run, shared by everyone who reads or writes one:

- :mod:`~shoal_api.runs.model`: the run record kept in NATS KV (``shoal-runs``), its
  events and the effects it asks for.
- :mod:`~shoal_api.runs.wire`: run submissions and the dispatcher's replies on NATS, and
  the record's key.

The state machine that advances a run is :mod:`shoal_core.runs` (shoal-core).
"""
