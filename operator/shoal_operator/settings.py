"""The names the operator writes under, shared by everything that writes.

Server-side apply attributes every field to a manager; the operator and the HPA
handover must keep using the same names across releases, or an upgrade would leave
fields owned by nobody. Kept free of imports so every layer may use them.
"""

from __future__ import annotations

FIELD_MANAGER = "shoal-operator"
# Keeps Deployment replicas at their value while the HPA takes them over.
HANDOVER_MANAGER = "shoal-handover"
FINALIZER = "shoal.dev/cleanup"
