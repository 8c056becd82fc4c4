"""Domain records as the contract's messages; no gRPC here, so the store may use it too."""
