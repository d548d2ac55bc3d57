"""Compatibility name of :mod:`shoal_operator.clients.jetstream` for the metrics API
module, which is being moved by a parallel change; delete once it imports the clients
package."""

from shoal_operator.clients.jetstream import JetStreamAdmin, combined, queue_counts

__all__ = ["JetStreamAdmin", "combined", "queue_counts"]
