"""Settings package: base, embedded (the `make run` default), test and production."""
