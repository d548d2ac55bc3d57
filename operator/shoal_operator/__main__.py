"""``python -m shoal_operator``: run the Shoal operator against the current kubeconfig
(or in-cluster credentials)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf

import shoal_operator.handlers  # noqa: F401  (registers the handlers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal-operator", description=__doc__)
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only these namespaces (default: the whole cluster)",
    )
    parser.add_argument(
        "--nats-url",
        default=os.environ.get("SHOAL_NATS_URL"),
        help="NATS the operator declares JetStream resources on (env SHOAL_NATS_URL)",
    )
    parser.add_argument(
        "--runtime-nats-url",
        default=os.environ.get("SHOAL_RUNTIME_NATS_URL"),
        help="NATS URL given to runtime pods, if it differs (env SHOAL_RUNTIME_NATS_URL)",
    )
    parser.add_argument(
        "--runtime-image",
        default=os.environ.get("SHOAL_RUNTIME_IMAGE"),
        help="default runtime image of Agents (env SHOAL_RUNTIME_IMAGE)",
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint kopf serves (fails when watching stalls)",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="do not coordinate with other operator replicas (peering)",
    )
    parser.add_argument(
        "--metrics-api-port",
        default=os.environ.get("SHOAL_METRICS_API_PORT", "6443"),
        help="HTTPS port of the external metrics API (env SHOAL_METRICS_API_PORT, default "
        "6443; 0 turns it off, 'auto' takes any free port)",
    )
    parser.add_argument(
        "--metrics-api-cert",
        default=os.environ.get("SHOAL_METRICS_API_CERT"),
        help="its serving certificate, PEM (default: self-signed at start-up)",
    )
    parser.add_argument(
        "--metrics-api-key",
        default=os.environ.get("SHOAL_METRICS_API_KEY"),
        help="the certificate's private key, PEM",
    )
    parser.add_argument(
        "--register-apiservice",
        choices=("local", "none"),
        default=os.environ.get("SHOAL_REGISTER_APISERVICE") or "none",
        help="local: register the APIService v1beta1.external.metrics.k8s.io pointing at "
        "this process through localhost (an operator outside the cluster), removed when it "
        "stops; none: the chart or manifests install it (env SHOAL_REGISTER_APISERVICE)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if bool(args.metrics_api_cert) != bool(args.metrics_api_key):
        parser.error("--metrics-api-cert and --metrics-api-key go together")
    if args.metrics_api_port != "auto" and not (
        args.metrics_api_port.isdigit() and int(args.metrics_api_port) <= 65535
    ):
        parser.error(f"--metrics-api-port: not a port: {args.metrics_api_port}")
    for env, value in (
        ("SHOAL_NATS_URL", args.nats_url),
        ("SHOAL_RUNTIME_NATS_URL", args.runtime_nats_url),
        ("SHOAL_RUNTIME_IMAGE", args.runtime_image),
        ("SHOAL_METRICS_API_PORT", args.metrics_api_port),
        ("SHOAL_METRICS_API_CERT", args.metrics_api_cert),
        ("SHOAL_METRICS_API_KEY", args.metrics_api_key),
        ("SHOAL_REGISTER_APISERVICE", args.register_apiservice),
    ):
        if value:
            os.environ[env] = value
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf reports every handled watch event at INFO; ours only queue work.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
            # Replicas coordinate by Lease-based leader election (shoal_operator.leader),
            # not kopf peering: standbys keep their caches warm for a fast takeover.
            standalone=True,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
