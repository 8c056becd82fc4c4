"""Generated stubs for the sartiq.generation.v1 proto package; do not edit."""
