"""Bad input (part of `prunefleet bench reliability`): fuzzed RPCs, damaged files and crafted streams."""
