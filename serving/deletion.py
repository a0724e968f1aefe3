"""Deleting many rows without one long transaction: the prediction log's retention, a deleted
deployment's purge, and billed prediction charges all delete this way."""

from __future__ import annotations

import time

from django.db.models import QuerySet


def delete_in_batches(
    rows: QuerySet, *, batch: int, deadline: float | None = None
) -> tuple[int, bool]:
    """Delete `rows` `batch` at a time, each batch its own short statement (so a backlog of
    millions never holds one long lock); how many were deleted, and whether none is left (False:
    it stopped at `deadline`, a time.monotonic() value, and the next run goes on from there)."""
    deleted = 0
    while True:
        ids = list(rows.order_by().values_list("pk", flat=True)[:batch])
        if ids:
            deleted += rows.filter(pk__in=ids).delete()[0]
        if len(ids) < batch:
            return deleted, True
        if deadline is not None and time.monotonic() >= deadline:
            return deleted, False
