"""Faults (part of `prunefleet bench reliability`): break a running fleet and check what it promises."""
