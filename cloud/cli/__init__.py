"""The `prunefleet` command: argument parsing and dispatch, above everything it dispatches to."""
