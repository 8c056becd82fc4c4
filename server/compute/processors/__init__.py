"""Task processors for the local compute backend: deterministic CPU image work."""
