"""The project's compute server: the local processors behind the compute wire protocol."""
