"""Sartiq generation service: the server package."""
