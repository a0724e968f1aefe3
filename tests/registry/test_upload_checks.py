"""The background check of an upload: answered at once in `checking`, unusable until the check
makes it `ready`; `rejected` keeps the reason and leaves no object and no usable version; the
check is owed through the outbox, so it still happens after the broker was down."""

from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from jobs.models import Job
from outbox.models import Message
from registry.models import DatasetVersion, StorageAccount
from registry.services import dataset_version_check, dataset_version_checks_resend
from tenants.models import AuditEvent
from tests.pool import Pool
from tests.processes import wait_for
from tests.registry.conftest import check_uploads, stored_files

# Passes the checks the request makes (a CSV, by its head), fails the reading.
BAD_CSV = b"a,b\n1,2\n3,4,5\n"


@pytest.fixture
def dev_client(org, member_factory, client_for):
    return client_for(member_factory(org, "developer"))


@pytest.fixture
def dev_page(org, member_factory, client):
    client.force_login(member_factory(org, "developer"))
    return client


def _upload(client, org, content: bytes, filename="data.csv", dataset="readings"):
    datasets = f"/api/v1/orgs/{org.slug}/datasets/"
    if not DatasetVersion.objects.filter(dataset__name=dataset).exists():
        client.post(datasets, {"name": dataset}, format="json")
    response = client.post(
        f"{datasets}{dataset}/versions/",
        {"file": SimpleUploadedFile(filename, content)},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    assert response.json()["state"] == "checking"
    return DatasetVersion.objects.get(dataset__name=dataset, number=response.json()["number"])


def _submit_training(client, org, version):
    return client.post(
        f"/api/v1/orgs/{org.slug}/jobs/",
        {
            "recipe": "tabular-classifier",
            "parameters": {"target": "age"},
            "dataset": {"dataset": version.dataset.name, "number": version.number},
        },
        format="json",
    )


pytestmark = pytest.mark.django_db


def test_an_upload_still_checking_cannot_be_used_by_a_job(org, dev_client, local_store, csv_bytes):
    version = _upload(dev_client, org, csv_bytes)

    refused = _submit_training(dev_client, org, version)
    download = dev_client.get(
        f"/api/v1/orgs/{org.slug}/datasets/readings/versions/{version.number}/download/"
    )

    assert refused.status_code == 409, refused.content
    assert refused.json()["code"] == "dataset_version_not_ready"
    assert "still being checked" in refused.json()["detail"]
    assert download.status_code == 409
    assert not Job.objects.exists()
    check_uploads()
    assert _submit_training(dev_client, org, version).status_code == 201
    assert Job.objects.get().input_dataset_version == version


def test_an_upload_the_check_rejects_leaves_no_object_and_no_usable_version(
    org, dev_client, local_store
):
    version = _upload(dev_client, org, BAD_CSV)
    assert stored_files(local_store) == [version.storage_key]

    [rejected] = check_uploads()

    assert rejected.state == DatasetVersion.State.REJECTED
    assert rejected.rejection_reason.startswith("Row 3 has 3 columns")
    assert rejected.storage_key is None and stored_files(local_store) == []
    assert StorageAccount.objects.get(organization=org).used_bytes == 0
    assert AuditEvent.objects.filter(action="dataset.version_reject", organization=org).exists()
    shown = dev_client.get(f"/api/v1/orgs/{org.slug}/datasets/readings/versions/1/").json()
    assert (shown["state"], shown["rejection_reason"]) == ("rejected", rejected.rejection_reason)
    refused = _submit_training(dev_client, org, rejected)
    assert refused.status_code == 409 and "rejected by its check" in refused.json()["detail"]
    assert rejected.rejection_reason in refused.json()["detail"]
    assert not Job.objects.exists()


def test_a_check_delivered_twice_decides_once(org, dev_client, local_store):
    """The outbox delivers at least once: a second check of a decided version changes
    nothing (no second refund, no second audit row)."""
    version = _upload(dev_client, org, BAD_CSV)
    check_uploads()

    assert dataset_version_check(version_id=version.pk) is None

    assert StorageAccount.objects.get(organization=org).used_bytes == 0
    assert AuditEvent.objects.filter(action="dataset.version_reject").count() == 1


def test_the_upload_owes_its_check_in_the_outbox(org, dev_client, local_store, csv_bytes):
    version = _upload(dev_client, org, csv_bytes)

    message = Message.objects.get()

    assert message.handler == "registry.services.datasets.dataset_version_check_send"
    assert message.payload == {"version_id": version.pk}


def test_a_check_silent_past_its_time_is_owed_again_and_then_runs(
    org, dev_client, local_store, csv_bytes
):
    """A check whose message was lost after the outbox sent it (a broker that dropped its
    queue) never writes its progress; once silent long enough it is owed again, once."""
    version = _upload(dev_client, org, csv_bytes)
    fresh = _upload(dev_client, org, csv_bytes)
    Message.objects.update(state=Message.State.SENT)  # sent, then lost with the queue
    DatasetVersion.objects.filter(pk=version.pk).update(
        check_touched_at=timezone.now() - timedelta(hours=1)
    )

    owed = dataset_version_checks_resend(silent_for=timedelta(minutes=40))
    owed_again = dataset_version_checks_resend(silent_for=timedelta(minutes=40))

    assert (owed, owed_again) == (1, 0)
    [message] = Message.objects.filter(state=Message.State.PENDING)
    assert message.payload == {"version_id": version.pk}
    assert fresh.pk not in [
        m.payload["version_id"] for m in Message.objects.filter(state="pending")
    ]
    check_uploads()
    version.refresh_from_db()
    assert version.state == DatasetVersion.State.READY


def test_the_version_page_shows_the_check_progress_then_redraws_once_checked(
    org, dev_client, dev_page, local_store, csv_bytes
):
    version = _upload(dev_client, org, csv_bytes)
    DatasetVersion.objects.filter(pk=version.pk).update(check_progress=0.42)
    url = f"/o/{org.slug}/datasets/readings/v/{version.number}/"

    page = dev_page.get(url)
    polled = dev_page.get(url, HTTP_HX_REQUEST="true")

    assert page.status_code == 200
    assert "Checking the file" in page.content.decode() and "42% read" in page.content.decode()
    assert 'hx-trigger="every 2s"' in polled.content.decode()
    assert "HX-Refresh" not in polled
    check_uploads()
    checked = dev_page.get(url, HTTP_HX_REQUEST="true")
    assert checked["HX-Refresh"] == "true"
    assert "Schema and profile" in dev_page.get(url).content.decode()


def test_the_version_page_shows_why_the_check_rejected_it(org, dev_client, dev_page, local_store):
    version = _upload(dev_client, org, BAD_CSV)
    check_uploads()

    url = f"/o/{org.slug}/datasets/readings/v/{version.number}/"
    page = dev_page.get(url)
    download = dev_page.get(f"{url}download/")

    body = page.content.decode()
    assert "Rejected" in body and "Row 3 has 3 columns" in body
    assert 'hx-trigger="every 2s"' not in body
    assert (download.status_code, download["Location"]) == (302, url)


@pytest.mark.django_db(transaction=True)
def test_uploads_during_a_broker_outage_are_checked_by_a_worker_once_it_is_back(
    org, dev_client, local_store, csv_bytes, broker_down, tmp_path
):
    """Both uploads are answered with the broker down (the check's send after commit fails and
    is only logged); once it is back, beat's outbox drain sends the checks and a real worker
    makes the good file ready and rejects the bad one, deleting its object."""
    good = _upload(dev_client, org, csv_bytes)
    bad = _upload(dev_client, org, BAD_CSV, filename="bad.csv")
    assert Message.objects.filter(state=Message.State.PENDING).count() == 2

    broker_down.start()
    pool = Pool(tmp_path)
    pool.env["OUTBOX_DRAIN_EVERY_S"] = "0.5"
    try:
        pool.start_control_plane()
        wait_for(
            lambda: not DatasetVersion.objects.filter(state="checking").exists(),
            timeout=90,
            what="a worker to check both uploads",
        )
    except AssertionError:
        print(pool.logs())
        raise
    finally:
        pool.stop()

    good.refresh_from_db()
    bad.refresh_from_db()
    assert (good.state, good.row_count, good.format) == ("ready", 3, "csv")
    assert good.profile["age"]["mean"] == pytest.approx((31 + 45 + 27) / 3)
    assert (bad.state, bad.storage_key) == ("rejected", None)
    assert "columns" in bad.rejection_reason
    assert stored_files(local_store) == [good.storage_key]
    assert StorageAccount.objects.get(organization=org).used_bytes == len(csv_bytes)
