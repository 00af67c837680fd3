"""Edge agent: holds a portfolio of variants in memory, serves inference, and switches variants locally.

fetcher (content-addressed, resumable, verified downloads), variants (a variant's record, and one made
ready to serve), backends (what serves them: torch, or ONNX Runtime without torch), runtime (in-memory
variants, atomic switch), loading (listed members as the edge records them, profiles),
policy (pure switching decisions), profiler (on-device latency), telemetry (request windows), metrics
(Prometheus), server (InferenceService, health, reflection), batching (micro-batches), link (Register
and the Connect stream), config (the agent's settings), portfolio_sync (fetch, verify, load and profile
a portfolio's variants), agent (the loops), cli (`prunefleet-edge`).
"""
