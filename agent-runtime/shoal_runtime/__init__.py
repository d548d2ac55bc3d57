"""The agent runtime: one process per pod that pulls an Agent's tasks from JetStream and
enforces its contract and failure handling. It depends on shoal_api, nats-py and the
standard library only: never on kopf or a Kubernetes client (import-linter checks)."""
