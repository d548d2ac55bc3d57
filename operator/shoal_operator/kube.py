"""Compatibility name of :mod:`shoal_operator.clients.kube` for the metrics API module,
which is being moved by a parallel change; delete once it imports the clients package."""

from shoal_operator.clients.kube import RESOURCES, Kube, NotFound, Resource, is_status

__all__ = ["RESOURCES", "Kube", "NotFound", "Resource", "is_status"]
