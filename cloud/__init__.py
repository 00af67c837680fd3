"""Cloud side: building portfolios (`build`), the cloud process (`service`), the operator client (`admin`),
the local fleet tooling (`localfleet`) and the `prunefleet` command (`cli`)."""
