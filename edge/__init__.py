"""Edge agent: fetcher, runtime (in-memory variants, switching), policy, telemetry, metrics, server."""
