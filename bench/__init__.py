"""Benchmark suites behind `prunefleet bench SUITE --json PATH [--quick]`.

The one package that may import both cloud and edge, to measure them side by side. Every suite
compares against a baseline measured in the same run and reports ratios.
"""
