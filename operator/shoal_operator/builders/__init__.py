"""Pure builders: a parsed spec in, the desired Kubernetes or JetStream object out (dicts).

Dicts, not generated client models: server-side apply sends exactly what is built, and
what the API server stores can be compared with it field by field.
"""
