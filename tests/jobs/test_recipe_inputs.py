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
from jobs.runner.parent import _Attempt
from jobs.scheduler.apply import scheduler_pass
from jobs.services import job_submit
from jobs.services.attempts import attempt_claim
from registry.models import DatasetVersion, ModelVersion
from tenants.actors import Actor

pytestmark = pytest.mark.django_db


@pytest.fixture
def dev_client(org, member_factory, client_for):
    return client_for(member_factory(org, "developer"))


@pytest.fixture
def worker(register_worker):
    return register_worker("cpu-inputs")


def upload(client, org, name: str, content: bytes, filename: str) -> tuple[dict, DatasetVersion]:
    """Create the dataset and upload its first version through the API, as a tenant does; the
    response and the version it recorded."""
    created = client.post(f"/api/v1/orgs/{org.slug}/datasets/", {"name": name}, format="json")
    assert created.status_code == 201, created.content
    response = client.post(
        f"/api/v1/orgs/{org.slug}/datasets/{name}/versions/",
        {"file": SimpleUploadedFile(filename, content)},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    return response.json(), DatasetVersion.objects.get(dataset__name=name, number=1)


def run_job(job: Job, worker, workdir) -> Job:
    """Place the job on `worker` and run its first attempt as the worker does."""
    scheduler_pass()
    claimed = attempt_claim(job_id=job.pk, attempt=1, worker_id=worker.pk)
    assert claimed is not None
    workdir.mkdir()
    _Attempt(claimed, 1, workdir).run()
    job.refresh_from_db()
    return job


def submit(org, owner, version: DatasetVersion, **kwargs) -> Job:
    job, _ = job_submit(
        organization=org,
        actor=Actor(user=owner),
        resource_class=kwargs.pop("resource_class"),
        dataset_version=version,
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
