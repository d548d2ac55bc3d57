"""Pure functions: a parsed spec in, the desired Kubernetes / JetStream object out (dicts)."""
