"""The data a retrain trains on when its policy appends feedback: the newest version of the
policy's dataset with the deployment's labelled predictions added as rows, saved as a new version
of that dataset through the registry (derived from the version it extends).

Only feedback labelled after the base version was made is appended, so a base that is itself a
feedback version does not get the same rows twice. CSV datasets only (what the tabular recipe
trains on); anything else trains on the newest version alone, saying why. Storage is read and
written here, so this never runs inside a transaction.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings

from registry.formats.csv_reader import CsvDialect
from registry.models import DatasetFormat, DatasetVersion
from registry.services import dataset_version_create
from registry.storage import get_storage
from tenants.actors import Actor
from tenants.errors import DomainError
from tenants.selectors import actor_scopes

from .models import Deployment, PredictionLog, Route


class FeedbackNotAppended(DomainError):
    code = "feedback_not_appended"


def _cell(value: Any) -> str | None:
    """A JSON scalar as a CSV cell; None for a value a cell cannot hold (an object, a list)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    return None


def feedback_rows(
    *, deployment: Deployment, columns: list[str], target: str, since, limit: int
) -> Iterator[list[str]]:
    """The live predictions labelled after `since`, as rows of `columns` (the label in `target`,
    the logged inputs in the others, a missing one empty). Rows whose inputs are not an object of
    scalars, or whose label is not a scalar, are left out: the tenant sent them, and a cell holds
    one value."""
    logged = (
        PredictionLog.objects.for_organization(deployment.organization)
        .filter(
            deployment=deployment,
            mode=Route.Mode.LIVE,
            label__isnull=False,
            labelled_at__gt=since,
        )
        .order_by("labelled_at", "pk")
        .values_list("inputs", "label")[:limit]
    )
    for inputs, label in logged.iterator(chunk_size=2000):
        if not isinstance(inputs, dict) or label is None:
            continue
        row = [_cell(label) if name == target else _cell(inputs.get(name)) for name in columns]
        if None not in row:
            yield row


def _copy_with_newline(version: DatasetVersion, path: Path) -> None:
    with get_storage().open(version.storage_key) as source, path.open("wb") as out:
        shutil.copyfileobj(source, out, length=1024 * 1024)
    with path.open("rb+") as out:
        out.seek(0, 2)
        if out.tell():
            out.seek(-1, 2)
            if out.read(1) not in (b"\n", b"\r"):
                out.write(b"\n")


def retrain_data_with_feedback(
    *, deployment: Deployment, base: DatasetVersion, target: str, actor: Actor
) -> tuple[DatasetVersion, int]:
    """(the version to train on, how many feedback rows it added): a new version of the base's
    dataset, or the base itself when there is no new labelled feedback. FeedbackNotAppended (or
    the registry's own error, e.g. the storage quota) says why none could be made."""
    if base.format != DatasetFormat.CSV:
        raise FeedbackNotAppended(f"feedback is appended to CSV datasets; {base} is {base.format}.")
    if "datasets:write" not in actor_scopes(organization=deployment.organization, actor=actor):
        raise FeedbackNotAppended(
            f"{actor.label} may not add versions to {base.dataset.name} (datasets:write)."
        )
    columns = [column["name"] for column in base.schema]
    if target not in columns:
        raise FeedbackNotAppended(f"{base} has no target column {target!r} to put labels in.")
    rows = list(
        feedback_rows(
            deployment=deployment,
            columns=columns,
            target=target,
            since=base.created_at,
            limit=settings.SERVING_LOOP_FEEDBACK_MAX_ROWS,
        )
    )
    if not rows:
        return base, 0
    dialect = CsvDialect.from_json(base.csv_dialect) if base.csv_dialect else CsvDialect()
    # A byte-order mark belongs at the start of the file only.
    encoding = "utf-8" if dialect.encoding == "utf-8-sig" else dialect.encoding
    with tempfile.TemporaryDirectory(prefix="feedback-") as folder:
        path = Path(folder) / f"{base.dataset.name}-feedback.csv"
        _copy_with_newline(base, path)
        try:
            with path.open("a", encoding=encoding, newline="") as out:
                csv.writer(out, delimiter=dialect.delimiter, lineterminator="\n").writerows(rows)
        except UnicodeEncodeError as exc:
            raise FeedbackNotAppended(
                f"a feedback value cannot be written in the dataset's encoding {encoding}."
            ) from exc
        version = dataset_version_create(
            dataset=base.dataset,
            path=path,
            filename=path.name,
            actor=actor,
            declared_format=DatasetFormat.CSV,
            derived_from_dataset_version=base,
        )
    return version, len(rows)
