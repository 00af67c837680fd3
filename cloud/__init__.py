"""Cloud side: training, pruning methods, the portfolio store, gRPC servers, coordinator, operator CLI."""
