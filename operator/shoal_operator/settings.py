"""Operator hygiene: names and the kopf settings every deployment of Shoal runs with."""

from __future__ import annotations

import logging

import kopf

FIELD_MANAGER = "shoal-operator"
# Keeps Deployment replicas at their value while the HPA takes them over.
HANDOVER_MANAGER = "shoal-handover"
FINALIZER = "shoal.dev/cleanup"


def configure(settings: kopf.OperatorSettings) -> None:
    # Watches can stall silently: bound them on both sides so the stream is re-opened,
    # and re-list when a stream has been silent for longer than the server timeout.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.watching.inactivity_timeout = 600
    settings.networking.request_timeout = 30
    # An Event per INFO log line floods the API server; the controller posts the
    # Events that matter (transitions) itself.
    settings.posting.level = logging.WARNING
