"""Compute: the backend interface, the local CPU backend and its processors."""
