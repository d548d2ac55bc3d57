"""Shoal's API: the resource models (the source of the CRDs and of every status the
operator writes) and the contracts every process shares: the NATS layout, the task
envelope, run records, the pod contract, time stamps and the KV compare-and-set.
No engines, no Kubernetes client: the runtime image installs this and its own package."""
