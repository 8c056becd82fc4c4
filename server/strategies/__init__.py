"""Strategies: per-strategy validation, records and the compute tasks each creates."""
