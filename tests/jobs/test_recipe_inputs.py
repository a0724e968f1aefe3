"""What the registry accepts is what the worker trains on: a dataset uploaded through the API,
then a job on it run by the worker's own attempt code (parent and a real child process), reads
the file exactly as the registry read it: every image format it accepts, the CSV dialect it
decided at upload."""

import io
import zipfile

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from jobs.models import Job, JobState
from jobs.recipes import text as text_recipe
from jobs.recipes import timeseries as timeseries_recipe
from jobs.recipes.base import RecipeContext, RecipeInputError
from jobs.recipes.data import read_table
from jobs.runner.parent import _Attempt
from jobs.scheduler.apply import scheduler_pass
from jobs.services import JobOptions, inference_job_submit, training_job_submit
from jobs.services.attempts import attempt_claim
from registry.formats import inspect_dataset
from registry.formats.csv_reader import CsvDialect
from registry.models import DatasetVersion, ModelVersion
from tenants.actors import Actor
from tests.registry.conftest import check_uploads

pytestmark = pytest.mark.django_db


@pytest.fixture
def dev_client(org, member_factory, client_for):
    return client_for(member_factory(org, "developer"))


@pytest.fixture
def worker(register_worker):
    return register_worker("cpu-inputs")


def upload(client, org, name: str, content: bytes, filename: str) -> tuple[dict, DatasetVersion]:
    """Create the dataset and upload its first version through the API, as a tenant does, and
    let the check read it; the version as the API then shows it, and its row."""
    created = client.post(f"/api/v1/orgs/{org.slug}/datasets/", {"name": name}, format="json")
    assert created.status_code == 201, created.content
    response = client.post(
        f"/api/v1/orgs/{org.slug}/datasets/{name}/versions/",
        {"file": SimpleUploadedFile(filename, content)},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    check_uploads()
    shown = client.get(f"/api/v1/orgs/{org.slug}/datasets/{name}/versions/1/")
    assert shown.json()["state"] == "ready", shown.json()
    return shown.json(), DatasetVersion.objects.get(dataset__name=name, number=1)


def run_job(job: Job, worker, workdir) -> Job:
    """Place the job on `worker` and run its first attempt as the worker does."""
    scheduler_pass()
    claimed = attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk)
    assert claimed is not None
    workdir.mkdir()
    _Attempt(claimed, 1, workdir).run()
    job.refresh_from_db()
    return job


def submit(org, owner, version: DatasetVersion, *, resource_class, kind=Job.Kind.TRAIN, **kwargs):
    submit_kind = inference_job_submit if kind == Job.Kind.INFER else training_job_submit
    job, _ = submit_kind(
        organization=org,
        actor=Actor(user=owner),
        dataset_version=version,
        options=JobOptions(resource_class=resource_class),
        **kwargs,
    )
    return job


# Images


def shapes(size: int = 16) -> dict[str, list[np.ndarray]]:
    """Bright squares and bright crosses on dark noise, six of each, as RGB uint8."""
    rng = np.random.default_rng(7)
    images: dict[str, list[np.ndarray]] = {"squares": [], "crosses": []}
    for index in range(6):
        for label in images:
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            low, high = 3 + index % 3, size - 3 - index % 3
            if label == "squares":
                pixels[low:high, low:high] = 230
            else:
                pixels[size // 2 - 1 : size // 2 + 1, low:high] = 230
                pixels[low:high, size // 2 - 1 : size // 2 + 1] = 230
            images[label].append(pixels)
    return images


def image_zip(pillow_format: str, suffix: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label, pixels_list in shapes().items():
            for index, pixels in enumerate(pixels_list):
                encoded = io.BytesIO()
                image = Image.fromarray(pixels)
                if pillow_format == "GIF":
                    image = image.convert("P")
                image.save(encoded, format=pillow_format)
                archive.writestr(f"{label}/{index}.{suffix}", encoded.getvalue())
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("pillow_format", "suffix", "registry_format"),
    [
        ("JPEG", "jpg", "jpeg"),
        ("GIF", "gif", "gif"),
        ("BMP", "bmp", "bmp"),
        ("WEBP", "webp", "webp"),
    ],
)
@pytest.mark.slow
def test_an_image_zip_the_registry_accepts_trains_on_the_worker(
    org,
    owner,
    dev_client,
    local_store,
    worker,
    cpu,
    tmp_path,
    pillow_format,
    suffix,
    registry_format,
):
    body, version = upload(
        dev_client, org, f"shapes-{suffix}", image_zip(pillow_format, suffix), "shapes.zip"
    )
    assert body["profile"]["image_sizes"]["formats"] == {registry_format: 12}

    job = submit(
        org,
        owner,
        version,
        resource_class=cpu,
        recipe="image-classifier",
        parameters={"image_size": 16, "epochs": 1, "width": 8, "batch_size": 8},
        output_model_name=f"shapes-{suffix}",
    )
    job = run_job(job, worker, tmp_path / "work")

    assert job.state == JobState.SUCCEEDED, job.failure_reason
    model = ModelVersion.objects.get(registered_model__name=f"shapes-{suffix}")
    assert model.trained_on.get() == version


# CSV


def reviews_csv() -> bytes:
    """A review export as spreadsheets write it: a byte order mark, semicolons, quoted texts
    holding semicolons and commas, and further down one review quoting someone with doubled
    quotes. The label follows the stars."""
    lines = ["id;review;stars;label"]
    for row in range(1, 81):
        stars = row % 5 + 1
        label = "good" if stars >= 3 else "bad"
        text = f'"Bought it; {"loved" if label == "good" else "hated"} it, {row} days"'
        if row == 57:
            text = '"She said ""fine; ok, whatever"" and left"'
        lines.append(f"{row};{text};{stars};{label}")
    return ("\ufeff" + "\r\n".join(lines) + "\r\n").encode()


@pytest.mark.slow
def test_a_csv_trains_and_predicts_on_exactly_the_rows_and_columns_the_registry_shows(
    org, owner, dev_client, local_store, worker, cpu, tmp_path
):
    body, version = upload(dev_client, org, "reviews", reviews_csv(), "reviews.csv")
    assert body["row_count"] == 80
    columns = [column["name"] for column in body["schema"]]
    assert columns == ["id", "review", "stars", "label"]
    assert body["csv_dialect"]["delimiter"] == ";"

    train = submit(
        org,
        owner,
        version,
        resource_class=cpu,
        recipe="tabular-classifier",
        parameters={"target": "label", "epochs": 2},
        output_model_name="reviews",
    )
    train = run_job(train, worker, tmp_path / "train")
    assert train.state == JobState.SUCCEEDED, train.failure_reason
    model = ModelVersion.objects.get(registered_model__name="reviews")

    infer = submit(
        org,
        owner,
        version,
        resource_class=cpu,
        kind=Job.Kind.INFER,
        model_version=model,
        output_dataset_name="reviews-scored",
    )
    infer = run_job(infer, worker, tmp_path / "infer")
    assert infer.state == JobState.SUCCEEDED, infer.failure_reason
    predictions = DatasetVersion.objects.get(dataset__name="reviews-scored")
    assert predictions.row_count == body["row_count"]
    assert [column["name"] for column in predictions.schema] == [
        "id",
        "review",
        "stars",
        "prediction",
        "probability",
    ]
    reviews = {row["review"] for row in predictions.preview}
    assert "Bought it; loved it, 2 days" in reviews


def test_every_csv_reader_follows_the_stored_dialect_rather_than_sniffing_again(tmp_path):
    """The registry, the tabular, text and time-series recipes read through one function with
    the dialect handed to them: given "|", a comma file is one column to all of them."""
    path = tmp_path / "data.csv"
    path.write_text("when,text,value\n2024-01-01,a,1\n2024-01-02,b,2\n", encoding="utf-8")
    stored = inspect_dataset(path).csv_dialect
    assert stored == CsvDialect(delimiter=",").as_json()
    piped = CsvDialect(delimiter="|")

    assert list(read_table(path, "csv", csv_dialect=piped).columns) == ["when,text,value"]
    ctx = RecipeContext(
        workdir=tmp_path,
        dataset_path=path,
        dataset_format="csv",
        parameters={},
        seed=0,
        output_dir=tmp_path,
        checkpoint_dir=tmp_path,
        devices=["cpu"],
        csv_dialect=piped,
    )
    [(header, rows)] = list(text_recipe._read_chunks(ctx))
    assert header == ["when,text,value"] and len(rows) == 2
    with pytest.raises(RecipeInputError, match="no column 'when'; its columns are: when,text"):
        list(timeseries_recipe._read_columns(ctx, ["when", "value"], 10))
    ctx.csv_dialect = CsvDialect.from_json(stored)
    assert next(timeseries_recipe._read_columns(ctx, ["when", "value"], 10)) == [
        ["2024-01-01", "2024-01-02"],
        ["1", "2"],
    ]
