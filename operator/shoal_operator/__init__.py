"""The Shoal operator: Agents, ScalingPolicies, Workflows and Approvals made real.

Layered so that each concern can be read and tested alone (enforced by import-linter,
see the root pyproject.toml): the composition root parses the configuration once, the
kopf glue only feeds the watch cache and the work queue, the loop runs each kind's
reconcile I/O, which asks pure reconcilers and builders what to do and the writer to
do it; the I/O clients sit at the bottom.
"""
