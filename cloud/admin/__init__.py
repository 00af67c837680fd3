"""What an operator's tools need below the CLI: the gRPC client of a running cloud, and certificate creation."""
