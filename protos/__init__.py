"""Generated gRPC stubs for package prunefleet.v1 (regenerate with `make protos`)."""
