"""The operators' pages under /ops/ (staff only): the overview, the pool and billing for all
tenants. The apps keep the selectors and reports that feed them."""
