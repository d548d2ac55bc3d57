"""Shoal's pure engines, shared by the operator and the ``shoal`` CLI: free of I/O, clocks
and clients (no NATS, no Kubernetes, no files, no plotting; import-linter checks), so
what they decide replays the same way in a test, in ``shoal simulate`` and in the
cluster.

- :mod:`shoal_core.runs`: the workflow run state machine the operator's dispatcher drives.
- :mod:`shoal_core.autoscale`: a ScalingPolicy's decisions, the forecast, a model of the
  HPA, and the simulation that replays a load trace through them.
"""
