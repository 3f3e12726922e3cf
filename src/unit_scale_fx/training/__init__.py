"""Training helpers: u-muP optimiser groups (:mod:`.optim`) and data-parallel plan sync and
reductions (:mod:`.distributed`)."""
