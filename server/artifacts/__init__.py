"""Artifacts: uploads and downloads by content hash, per organization."""
