"""ipyparallel.client: shoal's client side (see the submodules)."""
