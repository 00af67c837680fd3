"""Surgery: which channels are provably dead, their physical removal, and the equivalence check."""
