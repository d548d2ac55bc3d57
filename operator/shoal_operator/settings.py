"""Operator hygiene: the kopf settings every deployment of Shoal runs with."""

from __future__ import annotations

import logging

import kopf

FIELD_MANAGER = "shoal-operator"
FINALIZER = "shoal.dev/cleanup"


def configure(settings: kopf.OperatorSettings) -> None:
    # Watches can stall silently: bound them on both sides so kopf re-lists.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Handler errors retry with backoff but not forever.
    settings.execution.max_workers = 20
    # An Event per INFO log line floods the API server; Events are posted explicitly.
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="shoal.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="shoal.dev", key="last-handled-configuration"
    )
    settings.peering.name = "shoal"
    settings.peering.mandatory = False
