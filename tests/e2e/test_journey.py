"""A new tenant's whole journey in a real browser, then the operators' overview of it.

Headless Chromium against a live server on the test database, with a real pool (beat, a
default-queue worker and one CPU pool worker) training with torch behind it. Screenshots of each
step land in test-artifacts/e2e/; docs/user-guide.md shows them.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from django.core import mail
from playwright.sync_api import expect

from billing.invoicing import invoices_issue
from billing.selectors import billing_month
from jobs.samples.tabular import write_tabular_sample
from tests.factories import UserFactory

browser_test = pytest.mark.django_db(transaction=True)

PASSWORD = "a-long-and-unusual-passphrase-42"
JOB_TIMEOUT_MS = 180_000


def _sign_up(page, base: str, email: str) -> None:
    page.goto(f"{base}/accounts/signup/")
    page.fill("input[name=email]", email)
    page.fill("input[name=password1]", PASSWORD)
    page.fill("input[name=password2]", PASSWORD)
    page.screens("sign-up")
    page.locator("main form button[type=submit]").click()
    expect(page.get_by_text(re.compile("verify your email", re.I)).first).to_be_visible()
    link = re.search(r"https?://\S+/accounts/confirm-email/\S+/", mail.outbox[-1].body)
    assert link, mail.outbox[-1].body
    page.goto(link.group(0))
    page.get_by_role("button", name=re.compile("confirm", re.I)).click()


def _wait_for_state(page, label: str) -> None:
    """The job page refreshes itself (htmx, every 2 s) until the job ends."""
    expect(page.locator("#job-live .badge").first).to_have_text(label, timeout=JOB_TIMEOUT_MS)


@browser_test
def test_a_new_tenant_goes_from_sign_up_to_an_invoice_and_the_operator_sees_it(
    live_server, browser, page, pool, tmp_path, settings
):
    settings.SITE_URL = live_server.url  # signed download links point at the site's address
    pool.start_worker("browser")
    base = live_server.url

    # Sign up, confirm the address, create an organization.
    _sign_up(page, base, "ada@example.com")
    expect(page).to_have_url(re.compile(r"/orgs/new/$"))
    page.fill("input[name=name]", "Ada Lab")
    page.screens("create-organization")
    page.get_by_role("button", name=re.compile("create", re.I)).click()
    expect(page.locator("h1")).to_have_text("Ada Lab")
    slug = re.search(r"/o/([\w-]+)/", page.url).group(1)
    org = f"{base}/o/{slug}"

    # Upload a dataset with a progress bar.
    page.goto(f"{org}/datasets/")
    page.fill("input[name=name]", "churn")
    page.get_by_role("button", name="Create dataset").click()
    expect(page.locator("h1")).to_have_text("churn")
    csv_path = tmp_path / "churn.csv"
    write_tabular_sample(csv_path, rows=1500)
    page.set_input_files("#upload-file", str(csv_path))
    page.get_by_role("button", name="Upload").click()
    expect(page).to_have_url(re.compile(r"/datasets/churn/v/1/$"))
    # The version is checked in the background; its page polls and redraws once it is ready.
    expect(page.get_by_text("label").first).to_be_visible(timeout=60_000)
    page.screens("dataset-version")

    # Pick a recipe, fill its generated form, see the cost estimate, submit.
    page.get_by_role("link", name="Jobs", exact=True).click()
    page.get_by_role("button", name="New job").click()
    page.select_option("#recipe", "tabular-classifier")
    page.get_by_role("button", name="Choose").click()
    expect(page).to_have_url(re.compile(r"recipe=tabular-classifier"))
    page.select_option("#id_dataset_version", index=1)
    page.select_option("#id_resource_class", "cpu")
    page.fill("#id_max_runtime_s", "7200")
    page.fill("#id_output_model", "churn-model")
    page.fill("#id_labels", "project=retention")
    page.fill("#id_param_target", "label")
    page.fill("#id_param_epochs", "4")
    estimate = page.locator("output[data-prices-id]")
    expect(estimate).to_have_text(re.compile(r"^\$\d+\.\d\d$"))
    page.screens("submit-job")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator("h1")).to_contain_text("tabular-classifier")
    job_url = page.url

    # Watch it: state, log tail, loss curve, cost so far.
    _wait_for_state(page, "Succeeded")
    expect(page.locator("figure figcaption").first).to_contain_text("loss")
    expect(page.locator("pre.log")).to_contain_text("Training on")
    expect(page.get_by_text("Cost so far")).to_be_visible()
    page.screens("job-succeeded")

    # The registered model version: metrics and lineage; promote it to production.
    page.get_by_role("link", name=re.compile("churn-model")).first.click()
    expect(page.get_by_text("val_accuracy").first).to_be_visible()
    expect(page.get_by_text(re.compile("churn v1")).first).to_be_visible()  # lineage: its data
    page.screens("model-version")
    page.goto(f"{org}/models/churn-model/")
    page.fill("input[name=alias]", "production")
    page.get_by_role("button", name="Promote").click()
    expect(page.get_by_text(re.compile(r"production\s*→\s*v1"))).to_be_visible()
    page.screens("model-promoted")

    # A batch prediction with the production model; download the result.
    page.goto(f"{org}/jobs/")
    page.get_by_role("button", name="Batch prediction").click()
    expect(page).to_have_url(f"{org}/jobs/predict/")
    page.select_option("#id_model_version", index=1)
    page.select_option("#id_dataset_version", index=1)
    page.select_option("#id_resource_class", "cpu")
    page.get_by_role("button", name="Start prediction job").click()
    _wait_for_state(page, "Succeeded")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    saved = tmp_path / "predictions.csv"
    download.value.save_as(saved)
    header = saved.read_text().splitlines()[0]
    assert "prediction" in header, header
    page.screens("predictions")

    # Usage, budget, invoice.
    page.goto(f"{org}/billing/")
    page.fill("input[name=monthly_budget]", "100")
    page.get_by_role("button", name="Save budget").click()
    expect(page.get_by_text("Budget saved.")).to_be_visible()
    page.get_by_role("link", name="Usage report").first.click()
    expect(page.locator("svg").first).to_be_visible()
    expect(page.get_by_role("cell", name="gpu:cpu")).to_be_visible()
    page.screens("usage-report")
    # The built-in ledger invoices monthly (beat, on the 1st); issue this month's now.
    assert invoices_issue(month=billing_month(datetime.now(UTC))) == 1
    page.goto(f"{org}/billing/")
    page.get_by_role("link", name=re.compile(r"FS-\d{4}-\d+")).first.click()
    expect(page).to_have_url(re.compile(r"/billing/invoices/\d+/$"))
    expect(page.locator("h1")).to_contain_text("FS-")
    page.screens("invoice")
    with page.expect_download() as download:
        page.get_by_text("Download PDF").click()
    assert download.value.path().read_bytes().startswith(b"%PDF-")

    # The overview pulls it together.
    page.goto(f"{org}/")
    expect(page.get_by_text(re.compile(r"Spend this month"))).to_be_visible()
    page.screens("overview")
    # Keyboard first: the first Tab reaches the skip link, which jumps to the content.
    page.keyboard.press("Tab")
    expect(page.locator(":focus")).to_have_text("Skip to content")

    # At phone width no page scrolls sideways (wide tables scroll inside their own box).
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/", "/jobs/", job_url.removeprefix(org), "/datasets/", "/models/churn-model/",
                 "/billing/", "/billing/usage/", "/jobs/new/"):  # fmt: skip
        page.goto(f"{org}{path}")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than a phone"
    page.goto(f"{org}/jobs/")
    page.screens("phone-jobs")
    page.set_viewport_size({"width": 1280, "height": 900})
    assert not [line for line in page.console if "error" in line.lower()], page.console

    # An operator sees the same pool from /ops/, in a browser session of their own.
    UserFactory(email="ops@example.com", password=PASSWORD, is_staff=True, is_superuser=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    ops = context.new_page()
    ops.goto(f"{base}/accounts/login/?next=/ops/")
    ops.fill("input[name=login]", "ops@example.com")
    ops.fill("input[name=password]", PASSWORD)
    ops.get_by_role("button", name=re.compile("sign in", re.I)).click()
    expect(ops).to_have_url(f"{base}/ops/")
    expect(ops.get_by_role("cell", name="Ada Lab").first).to_be_visible()  # a top spender
    expect(ops.locator("svg").first).to_be_visible()  # utilization per class
    page.screens("ops-overview", page=ops)
    ops.goto(f"{base}/ops/billing/")
    expect(ops.get_by_text("Revenue").first).to_be_visible()
    page.screens("ops-billing", page=ops)
    context.close()
