"""Python gRPC stubs and client for the Sartiq generation and catalog APIs."""
