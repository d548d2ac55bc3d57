"""``python -m shoal_operator``: the composition root.

Parses the configuration once (flags over environment over defaults), sets up logging,
registers the kopf glue on a registry of its own and runs kopf with it. Everything the
operator does follows from the one frozen :class:`~shoal_operator.config.OperatorConfig`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import kopf

from shoal_operator import config as config_mod
from shoal_operator import watches
from shoal_operator.app import Operator
from shoal_operator.config import OperatorConfig


async def run(cfg: OperatorConfig) -> None:
    """kopf, running the operator of ``cfg`` until it is told to stop."""
    registry = kopf.OperatorRegistry()
    watches.register(registry, Operator(lambda: cfg))
    await kopf.operator(
        registry=registry,
        clusterwide=not cfg.namespaces,
        namespaces=cfg.namespaces,
        liveness_endpoint=cfg.liveness,
        # Replicas coordinate by Lease-based leader election (clients.leader), never by
        # kopf peering: standbys keep their caches warm for a fast takeover.
        # ``--standalone`` turns the leader election off instead (see config).
        standalone=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = config_mod.parse(sys.argv[1:] if argv is None else argv, os.environ)
    logging.basicConfig(
        level=logging.DEBUG if cfg.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not cfg.verbose:
        # kopf reports every handled watch event at INFO; ours only queue work.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(run(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
