"""The agent runtime: one process per pod (``python -m shoal_runtime``) that pulls an
Agent's tasks from JetStream and enforces its contract and failure handling. Its image
holds shoal-api and this package only: it depends on nats-py, prometheus-client and httpx
(OpenAI-compatible calls), never on kopf, a Kubernetes client, shoal-core or the CLI
(import-linter checks).

Handler authors need :mod:`shoal_runtime.sdk` only. Inside, from the top down:
:mod:`~shoal_runtime.__main__` (probes, signals) -> :mod:`~shoal_runtime.worker` (fetch
loop, drain) -> :mod:`~shoal_runtime.execution` (handler call, outcomes, batching) ->
:mod:`~shoal_runtime.admission` (contract, cache, budget, rate limits, breaker) ->
:mod:`~shoal_runtime.records` (results, dead letters, forwards) ->
:mod:`~shoal_runtime.worker_state`; below them the building blocks (handler loading, LLM
calls, shared KV state, circuit breaker, JetStream pulling, metrics, settings from the pod
contract :mod:`shoal_api.pod_contract`).
"""
