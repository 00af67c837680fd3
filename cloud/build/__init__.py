"""Building portfolios: training, data-parallel workers, pruning methods, surgery, and the store."""
