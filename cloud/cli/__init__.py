"""The `prunefleet` command: argument parsing and dispatch, above everything it dispatches to."""

# `portfolio build`'s one-line help: `prunefleet --help` lists it without generating the build's flags.
BUILD_HELP = "train a model and derive a portfolio of pruned variants"
