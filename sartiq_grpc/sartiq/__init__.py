"""Generated stubs for the sartiq proto package; do not edit."""
