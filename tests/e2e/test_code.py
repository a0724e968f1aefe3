"""A tenant brings their own code in a real browser: uploads the example package on the Code
page, reads its manifest and parameters, runs it from the form drawn from its schema, and lands
on the job's page with the parameters it chose.

Headless Chromium against a live server on the test database. The job is queued, not run:
tests/jobs/test_code_jobs.py runs packages on real workers in real sandboxes; this test is about
the pages. Screenshots land in test-artifacts/e2e/.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from jobs.models import Job
from registry.management.commands.seed_code import example_folder, package_zip
from registry.models import CodePackageVersion
from tests.factories import TEST_PASSWORD
from tests.registry.conftest import local_store  # noqa: F401  a fixture used below

browser_test = pytest.mark.django_db(transaction=True)


@browser_test
def test_a_tenant_uploads_the_example_package_and_runs_it_from_the_dashboard(
    live_server,
    page,
    org,
    member_factory,
    tmp_path,
    local_store,  # noqa: F811
):
    developer = member_factory(org, "developer")
    archive = package_zip(example_folder(), tmp_path / "tiny-cnn.zip")
    org_url = f"{live_server.url}/o/{org.slug}"

    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("input[name=login]", developer.email)
    page.fill("input[name=password]", TEST_PASSWORD)
    page.locator("main form button[type=submit]").click()
    expect(page).not_to_have_url(re.compile(r"/accounts/login/"))

    # Upload the package on the Code page.
    page.goto(f"{org_url}/code/")
    expect(page.get_by_text("No code packages yet.")).to_be_visible()
    page.set_input_files("input[name=file]", str(archive))
    page.screens("code-upload")
    page.get_by_role("button", name="Upload").click()
    version = CodePackageVersion.objects.get(organization=org, package__name="tiny-cnn")
    page.goto(f"{org_url}/code/tiny-cnn/v/{version.number}/")
    expect(page.locator("main")).to_contain_text("tinycnn.train:run")
    expect(page.locator("main")).to_contain_text("learning_rate")
    page.screens("code-version")

    # Run it from the form drawn from its parameters schema.
    page.get_by_role("button", name="Run this version").click()
    expect(page.locator("h1")).to_have_text(f"Run tiny-cnn v{version.number}")
    page.fill("input[name=param_steps]", "120")
    page.select_option("select[name=param_optimizer]", "sgd")
    page.check("input[name=param_augment]")
    page.screens("code-run")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page).to_have_url(re.compile(r"/jobs/\d+/"))
    job = Job.objects.get(organization=org)
    assert job.code_package_version == version
    assert job.parameters["steps"] == 120
    assert job.parameters["optimizer"] == "sgd" and job.parameters["augment"] is True
    assert job.runtime == "torch-2.13-py311" and job.created_by == developer
    page.screens("code-job")
