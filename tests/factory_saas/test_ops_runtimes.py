"""The runtimes workers report, as operators see them: /ops/runtimes/ and the admin."""

import pytest
from django.urls import reverse

from jobs.models import Runtime
from jobs.runtimes import RuntimeReport
from jobs.services.pool import worker_register
from tenants.scopes import Role
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db

TORCH = "torch-2.13-py311"


@pytest.fixture
def reported():
    working = RuntimeReport(
        name=TORCH,
        interpreter="/srv/factory/.venv/bin/python",
        python_version="3.11.7",
        packages={"torch": "2.13.0", "numpy": "2.4.6", "safetensors": "0.8.0"},
    )
    broken = RuntimeReport(
        name=TORCH,
        interpreter="/opt/runtimes/torch/bin/python",
        error="its interpreter exited with status 1: libcudart.so.13 missing",
    )
    worker_register(name="gpu-ok", devices=[], runtimes=[working])
    worker_register(name="gpu-broken", devices=[], runtimes=[broken])
    worker_register(name="gpu-none", devices=[])
    return Runtime.objects.get(name=TORCH)


def test_runtimes_page_shows_packages_and_which_workers_have_them(client, reported):
    client.force_login(UserFactory(is_staff=True))
    page = client.get(reverse("ops_runtimes"))
    assert page.status_code == 200
    html = page.content.decode()
    assert TORCH in html and "Python 3.11.7" in html and "3 packages" in html
    assert "<td>torch</td><td>2.13.0</td>" in html and "<td>numpy</td><td>2.4.6</td>" in html
    assert "gpu-ok" in html and "gpu-broken" in html and "gpu-none" not in html
    assert "libcudart.so.13 missing" in html
    assert reverse("admin:jobs_runtime_change", args=[reported.pk]) in html


def test_a_runtime_no_worker_offers_any_more_says_its_jobs_wait(client, reported):
    worker_register(name="gpu-ok", devices=[])
    worker_register(name="gpu-broken", devices=[])
    client.force_login(UserFactory(is_staff=True))
    html = client.get(reverse("ops_runtimes")).content.decode()
    assert "No worker offers it now; jobs that need it wait." in html


def test_runtimes_page_is_for_staff(client, reported):
    owner = MembershipFactory(organization=OrganizationFactory(), role=Role.OWNER).user
    client.force_login(owner)
    response = client.get(reverse("ops_runtimes"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_pool_page_links_to_the_runtimes(client):
    client.force_login(UserFactory(is_staff=True))
    assert reverse("ops_runtimes") in client.get(reverse("ops_pool")).content.decode()


def test_admin_shows_runtimes_read_only_and_on_each_worker(admin_client, reported):
    listing = admin_client.get(reverse("admin:jobs_runtime_changelist"))
    assert listing.status_code == 200
    assert TORCH in listing.content.decode() and "1/2" in listing.content.decode()
    detail = admin_client.get(reverse("admin:jobs_runtime_change", args=[reported.pk]))
    assert detail.status_code == 200
    assert "libcudart.so.13 missing" in detail.content.decode()
    assert b'name="_save"' not in detail.content
    assert admin_client.get(reverse("admin:jobs_runtime_add")).status_code == 403
    deleting = admin_client.post(reverse("admin:jobs_runtime_delete", args=[reported.pk]))
    assert deleting.status_code == 403 and Runtime.objects.filter(pk=reported.pk).exists()
    worker = reported.worker_reports.get(error="").worker
    page = admin_client.get(reverse("admin:jobs_worker_change", args=[worker.pk]))
    assert page.status_code == 200 and TORCH in page.content.decode()
