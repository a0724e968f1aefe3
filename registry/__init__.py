"""Datasets, the model registry, artifact storage and lineage (issue: registry)."""
