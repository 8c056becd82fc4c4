"""Generated stubs for the sartiq.catalog.v1 proto package; do not edit."""
