"""Pure reconcilers: (parsed spec, observed state, now) -> desired children + status."""
