"""Queue-driven scaling in the operator: the loop that does what the HPA cannot, and
the external metrics API the HPAs read.

Why a package: the HPA enforces 1..N scaling from figures this package serves, and the
operator does only 0<->1, schedule floors, forecasts and pod deletion costs; both read
the same queue figures. Each module has one reason to change:

- :mod:`.queue_metrics`: per-Agent figures from JetStream, cached briefly (no HTTP);
- :mod:`.metrics_api_server`: ``external.metrics.k8s.io`` over HTTPS, and its config;
- :mod:`.tls`: the serving certificate;
- :mod:`.apiservice_registration`: the APIService (the only module here that talks to
  the Kubernetes API);
- :mod:`.autoscaler`: the once-a-second loop (decisions are pure, in
  :mod:`shoal_core.autoscale`).

Nothing here imports kopf or the controller (an import-linter contract): the controller
and the kopf glue start these, and are told what happens through callbacks.
"""

from shoal_operator.scaling.apiservice_registration import Registration
from shoal_operator.scaling.autoscaler import Autoscaler, MetricSource, PolicyView
from shoal_operator.scaling.metrics_api_server import MetricsApiConfig, MetricsApiServer
from shoal_operator.scaling.queue_metrics import MAX_AGE_SECONDS, QueueMetrics

__all__ = [
    "MAX_AGE_SECONDS",
    "Autoscaler",
    "MetricSource",
    "MetricsApiConfig",
    "MetricsApiServer",
    "PolicyView",
    "QueueMetrics",
    "Registration",
]
