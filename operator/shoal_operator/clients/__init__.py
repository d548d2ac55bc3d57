"""The operator's I/O clients: the Kubernetes API, JetStream administration, leader
election and the watch heartbeat.

Kept apart so that everything above them (the controller, the per-kind reconcile I/O)
can be tested against fakes, and so that import-linter can keep the pure reconcilers
and builders from ever reaching a network.
"""
