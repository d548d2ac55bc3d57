"""The pure autoscaling logic of a ScalingPolicy.

The operator calls :func:`~shoal_core.autoscale.policy.plan` every second with what it
observed; ``shoal simulate`` replays a load trace through the same functions and a model
of the Kubernetes HPA (:mod:`~shoal_core.autoscale.hpa_model`). Nothing here does I/O or
reads the clock, so a trace replays the same way every time.

- :mod:`~shoal_core.autoscale.schedule`: the floor that schedule windows set now.
- :mod:`~shoal_core.autoscale.forecast`: additive Holt-Winters forecast of arrivals.
- :mod:`~shoal_core.autoscale.policy`: the HPA's bounds, 0 <-> 1 and the reason, in words.
- :mod:`~shoal_core.autoscale.hpa_model`: the HPA controller's algorithm.
- :mod:`~shoal_core.autoscale.simulate`: the queue, the pods, the operator and the HPA
  together, one second at a time.
"""
