"""Sample datasets written by code, for demos and tests: one module per kind of data, each with
a `write_<kind>_sample(path, *, ..., seed=0)` that needs no download and no torch."""

from jobs.samples.images import write_image_sample
from jobs.samples.tabular import write_tabular_sample
from jobs.samples.text import write_text_sample
from jobs.samples.timeseries import write_timeseries_sample

__all__ = [
    "write_image_sample",
    "write_tabular_sample",
    "write_text_sample",
    "write_timeseries_sample",
]
