"""The demo and the local cluster: start cloud and edge processes and talk to them over gRPC."""
