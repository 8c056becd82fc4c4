"""Generated stubs for the sartiq.catalog proto package; do not edit."""
