"""Pure reconcilers: (parsed spec, observed state, now) -> desired children + status model.

Everything the operator decides is decided here, with no I/O and no clock of its own,
so that every decision (a handover, a condition, an Event) is a unit test away, and
equal input always gives equal (sorted) output: a re-reconcile writes nothing.
"""
