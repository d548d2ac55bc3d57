"""``python -m shoal_operator``: run the Shoal operator against the current kubeconfig."""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf

import shoal_operator.handlers  # noqa: F401  (registers the handlers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal-operator", description=__doc__)
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only these namespaces (default: all)",
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL kopf serves",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="do not coordinate with other operator replicas (peering)",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
            standalone=args.standalone,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
