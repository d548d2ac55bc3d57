"""The operator's configuration, parsed once at start-up into one frozen value.

Flags win over environment variables, which win over defaults; the environment names
are the ones the Helm chart and the manifests set. Nothing reads ``os.environ`` after
this: the composition root hands the value down, so what runs is what was parsed
(and a test can build any configuration without touching the process environment).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shoal_operator.scaling import MAX_AGE_SECONDS, MetricsApiConfig

DEFAULT_RUNTIME_IMAGE = "ghcr.io/shoal-dev/shoal-runtime:0.1.0"
DEFAULT_NATS_URL = "nats://nats:4222"
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
DEFAULT_METRICS_PORT = 9090
DEFAULT_WORKERS = 32
DEFAULT_DRIFT_INTERVAL = 60.0
DEFAULT_HEARTBEAT_INTERVAL = 10.0


@dataclass(frozen=True)
class OperatorConfig:
    """What one operator process runs with; built by :func:`parse` or :func:`from_env`."""

    namespaces: tuple[str, ...] = ()
    """Watched namespaces; empty: the whole cluster."""
    nats_url: str = DEFAULT_NATS_URL
    """NATS the operator declares JetStream resources on."""
    runtime_nats_url: str = DEFAULT_NATS_URL
    """NATS URL given to runtime pods (the operator's unless set apart)."""
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    """Default runtime image of Agents."""
    liveness: str = DEFAULT_LIVENESS
    """Liveness endpoint kopf serves (fails when watching stalls)."""
    own_namespace: str | None = None
    """Where the operator's Leases live; None: no leader election, no heartbeat."""
    leader_election: bool = True
    """Coordinate with other replicas through a Lease (needs ``own_namespace``)."""
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    workers: int = DEFAULT_WORKERS
    drift_interval: float = DEFAULT_DRIFT_INTERVAL
    metrics_port: int = DEFAULT_METRICS_PORT
    """Prometheus port of the operator's own metrics; 0: off."""
    metrics_max_age: float = MAX_AGE_SECONDS
    """How stale a served external metric may be."""
    metrics_api: MetricsApiConfig | None = field(default_factory=MetricsApiConfig)
    """The external metrics API; None when its settings were nonsense (then it is off
    and ``metrics_api_error`` says why: the operator runs without it)."""
    metrics_api_error: str | None = None
    instance: str = ""
    """This replica's name on Events (the pod's, POD_NAME); "": the host name."""
    verbose: bool = False

    @property
    def leads_alone(self) -> bool:
        """No leader election: this replica is always in charge."""
        return self.own_namespace is None or not self.leader_election


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The command line; defaults come from ``environ``."""
    p = argparse.ArgumentParser(
        prog="shoal-operator",
        description="Run the Shoal operator against the current kubeconfig (or in-cluster "
        "credentials).",
    )
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only these namespaces (default: the whole cluster)",
    )
    p.add_argument(
        "--nats-url",
        default=environ.get("SHOAL_NATS_URL"),
        help="NATS the operator declares JetStream resources on (env SHOAL_NATS_URL)",
    )
    p.add_argument(
        "--runtime-nats-url",
        default=environ.get("SHOAL_RUNTIME_NATS_URL"),
        help="NATS URL given to runtime pods, if it differs (env SHOAL_RUNTIME_NATS_URL)",
    )
    p.add_argument(
        "--runtime-image",
        default=environ.get("SHOAL_RUNTIME_IMAGE"),
        help="default runtime image of Agents (env SHOAL_RUNTIME_IMAGE)",
    )
    p.add_argument(
        "--liveness",
        default=DEFAULT_LIVENESS,
        help="liveness endpoint kopf serves (fails when watching stalls)",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help="do not coordinate with other operator replicas: no leader election, this "
        "replica is always in charge (run one replica only; same as "
        "SHOAL_LEADER_ELECTION=false)",
    )
    p.add_argument(
        "--metrics-api-port",
        default=environ.get("SHOAL_METRICS_API_PORT", "6443"),
        help="HTTPS port of the external metrics API (env SHOAL_METRICS_API_PORT, default "
        "6443; 0 turns it off, 'auto' takes any free port)",
    )
    p.add_argument(
        "--metrics-api-cert",
        default=environ.get("SHOAL_METRICS_API_CERT"),
        help="its serving certificate, PEM (default: self-signed at start-up)",
    )
    p.add_argument(
        "--metrics-api-key",
        default=environ.get("SHOAL_METRICS_API_KEY"),
        help="the certificate's private key, PEM",
    )
    p.add_argument(
        "--register-apiservice",
        choices=("local", "none"),
        default=environ.get("SHOAL_REGISTER_APISERVICE") or "none",
        help="local: register the APIService v1beta1.external.metrics.k8s.io pointing at "
        "this process through localhost (an operator outside the cluster), removed when it "
        "stops; none: the chart or manifests install it (env SHOAL_REGISTER_APISERVICE)",
    )
    p.add_argument("--verbose", action="store_true")
    return p


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> OperatorConfig:
    """The configuration of ``python -m shoal_operator`` (exits on a bad flag)."""
    p = parser(environ)
    args = p.parse_args(list(argv))
    if bool(args.metrics_api_cert) != bool(args.metrics_api_key):
        p.error("--metrics-api-cert and --metrics-api-key go together")
    if args.metrics_api_port != "auto" and not (
        args.metrics_api_port.isdigit() and int(args.metrics_api_port) <= 65535
    ):
        p.error(f"--metrics-api-port: not a port: {args.metrics_api_port}")
    # An empty flag value leaves the environment's setting in place.
    flags = {
        "SHOAL_NATS_URL": args.nats_url,
        "SHOAL_RUNTIME_NATS_URL": args.runtime_nats_url,
        "SHOAL_RUNTIME_IMAGE": args.runtime_image,
        "SHOAL_METRICS_API_PORT": args.metrics_api_port,
        "SHOAL_METRICS_API_CERT": args.metrics_api_cert,
        "SHOAL_METRICS_API_KEY": args.metrics_api_key,
        "SHOAL_REGISTER_APISERVICE": args.register_apiservice,
    }
    merged = {**environ, **{k: v for k, v in flags.items() if v}}
    return from_env(
        merged,
        namespaces=tuple(args.namespace),
        liveness=args.liveness,
        standalone=args.standalone,
        verbose=args.verbose,
    )


def from_env(
    environ: Mapping[str, str],
    *,
    namespaces: tuple[str, ...] = (),
    liveness: str = DEFAULT_LIVENESS,
    standalone: bool = False,
    verbose: bool = False,
) -> OperatorConfig:
    """The configuration from environment variables alone (``kopf run``, where kopf
    parses the command line itself)."""
    nats_url = environ.get("SHOAL_NATS_URL") or DEFAULT_NATS_URL
    metrics_api: MetricsApiConfig | None
    try:
        metrics_api, error = MetricsApiConfig.from_env(environ), None
    except ValueError as exc:
        metrics_api, error = None, str(exc)
    return OperatorConfig(
        namespaces=namespaces,
        nats_url=nats_url,
        runtime_nats_url=environ.get("SHOAL_RUNTIME_NATS_URL") or nats_url,
        runtime_image=environ.get("SHOAL_RUNTIME_IMAGE") or DEFAULT_RUNTIME_IMAGE,
        liveness=liveness,
        own_namespace=environ.get("SHOAL_OPERATOR_NAMESPACE") or None,
        leader_election=not standalone and environ.get("SHOAL_LEADER_ELECTION") != "false",
        heartbeat_interval=float(
            environ.get("SHOAL_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL)
        ),
        workers=int(environ.get("SHOAL_WORKERS", DEFAULT_WORKERS)),
        drift_interval=float(environ.get("SHOAL_DRIFT_INTERVAL", DEFAULT_DRIFT_INTERVAL)),
        metrics_port=int(environ.get("SHOAL_OPERATOR_METRICS_PORT", DEFAULT_METRICS_PORT)),
        metrics_max_age=float(environ.get("SHOAL_METRICS_MAX_AGE", MAX_AGE_SECONDS)),
        metrics_api=metrics_api,
        metrics_api_error=error,
        instance=environ.get("POD_NAME", ""),
        verbose=verbose,
    )
