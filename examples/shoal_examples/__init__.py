"""Handlers of the examples in examples/: small, deterministic stand-ins for the models a
real deployment would call, so the examples run anywhere (the local cluster included)."""
