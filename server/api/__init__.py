"""The gRPC layer, the only one that imports grpc: servicers, conversion, errors, plumbing."""
