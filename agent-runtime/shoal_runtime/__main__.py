"""``python -m shoal_runtime``: the agent runtime of one pod.

Readiness turns false first on SIGTERM, then fetching stops, in-flight tasks finish
within the grace period and whatever cannot finish is handed back to JetStream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shoal_api import pod_contract as pod
from shoal_runtime.config import ConfigError, Settings
from shoal_runtime.handler_loading import HandlerLoadError
from shoal_runtime.probes import ProbeServer, Route
from shoal_runtime.worker import Worker

log = logging.getLogger("shoal.runtime")


def _probe(ok: bool, what: str) -> tuple[int, str, bytes]:
    return (200 if ok else 503), "text/plain", f"{what}: {'ok' if ok else 'no'}\n".encode()


def health_routes(worker: Worker) -> dict[str, Route]:
    """Liveness and readiness, on the pod contract's paths (the probes of the Deployment)."""
    return {
        pod.LIVENESS_PATH: lambda: _probe(worker.alive, "live"),
        pod.READINESS_PATH: lambda: _probe(worker.ready and not worker.stopping, "ready"),
    }


def metrics_routes(worker: Worker) -> dict[str, Route]:
    return {
        pod.METRICS_PATH: lambda: (
            200,
            CONTENT_TYPE_LATEST,
            generate_latest(worker.metrics.registry),
        )
    }


async def serve(settings: Settings) -> None:
    worker = Worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health = ProbeServer(health_routes(worker))
    metrics = ProbeServer(metrics_routes(worker))
    await health.listen(settings.health_port)
    await metrics.listen(settings.metrics_port)
    try:
        await worker.run(stop)
    finally:
        await health.close()
        await metrics.close()
    log.info("stopped")


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("SHOAL_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(2)
    try:
        asyncio.run(serve(settings))
    except HandlerLoadError as exc:
        log.error("%s", exc)
        sys.exit(3)


if __name__ == "__main__":
    main()
