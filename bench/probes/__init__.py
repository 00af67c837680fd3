"""Programs a suite runs in a fresh process to read resident memory (`python -m bench.probes.NAME`)."""
