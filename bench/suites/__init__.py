"""The benchmark suites behind `prunefleet bench SUITE`, one module each."""
