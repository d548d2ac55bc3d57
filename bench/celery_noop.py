"""The Celery app of bench/runtime_throughput.py: one no-op task, Redis broker and result
backend (``BENCH_REDIS_URL``). Celery's defaults otherwise (early ack, prefetch 4)."""

from __future__ import annotations

import os

from celery import Celery  # type: ignore[import-untyped]

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("bench_noop", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop(i: int) -> int:
    return i
