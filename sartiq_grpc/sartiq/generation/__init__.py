"""Generated stubs for the sartiq.generation proto package; do not edit."""
