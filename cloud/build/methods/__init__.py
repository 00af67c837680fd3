"""Pruning methods (`METHODS`), their scorers and masks."""
