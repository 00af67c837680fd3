"""The cloud process: gRPC servers, coordinator, fleet database, rollouts, catalog, validation, metrics."""
