"""Built-in invoices: a month of the ledger, a plan fee, credits and tax; numbered once a month."""

import re
import threading
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import Sum
from django.urls import reverse
from django.utils import timezone

from billing import tasks
from billing.errors import BillingError
from billing.invoicing import invoice_issue, invoice_mark_paid, invoices_issue
from billing.models import BillingAccount, CreditGrant, Invoice, Plan, UsageRecord
from billing.pdf import invoice_pdf
from billing.selectors import billing_month
from billing.services import credit_grant, usage_record
from tenants.actors import Actor
from tenants.models import AuditEvent
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

OCT = date(2026, 10, 1)
OCT_START = datetime(2026, 10, 1, tzinfo=UTC)
NOV_START = datetime(2026, 11, 1, tzinfo=UTC)
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)


def _use(org, resource, unit, quantity, at, recorded=None):
    record, _ = usage_record(
        organization=org,
        resource=resource,
        quantity=Decimal(quantity),
        unit=unit,
        period_start=at,
        period_end=at,
        idempotency_key=f"t:{org.pk}:{resource}:{at.isoformat()}:{quantity}",
    )
    # Recorded when the usage ended, as the meters record it (invoices bill by recording time).
    UsageRecord.objects.filter(pk=record.pk).update(created_at=recorded or at)
    record.created_at = recorded or at
    return record


def _gpu(org, seconds, at):
    return _use(org, "gpu:a100-40gb", "gpu_second", seconds, at)


def _account(org, *, fee=0, tax="0"):
    plan = Plan.objects.create(code=f"test-{org.pk}", name="Pro", monthly_fee_minor=fee)
    return BillingAccount.objects.create(
        organization=org, plan=plan, tax_rate_percent=Decimal(tax), created_at=LONG_AGO
    )


def _october(org):
    """Two resources in October ($3.87 of GPU at $0.0008/s, 2 cents of storage) and rows
    on either side of the month that are not October's."""
    _gpu(org, "3600", OCT_START)  # the first instant is October's: 288 cents
    _gpu(org, "1234.5", datetime(2026, 10, 20, tzinfo=UTC))  # 98.76 more: 387 in all
    _use(org, "storage", "gb_month", "0.333333", datetime(2026, 10, 10, tzinfo=UTC))
    _use(org, "storage", "gb_month", "0.333333", datetime(2026, 10, 11, tzinfo=UTC))
    _gpu(org, "1000", NOV_START)  # November's
    _gpu(org, "1000", OCT_START - timedelta(seconds=1))  # September's


def _grant_in_october(org, amount, key, **extra):
    """A credit held during October (invoices apply only credits granted before the month ends)."""
    grant, _ = credit_grant(
        organization=org, amount_minor=amount, reason=key, idempotency_key=key, **extra
    )
    CreditGrant.objects.filter(pk=grant.pk).update(created_at=OCT_START)


@pytest.fixture
def invoiced(org):
    """October invoiced: usage 389, fee 1000, credits 150, tax 20% of 1239 = 247.8 -> 248."""
    _account(org, fee=1000, tax="20")
    _october(org)
    _grant_in_october(org, 150, "welcome")
    _grant_in_october(org, 500, "expired", expires_at=datetime(2026, 10, 15, tzinfo=UTC))
    assert invoices_issue(month=OCT) == 1
    return Invoice.objects.get(organization=org)


def test_a_month_of_usage_becomes_one_invoice_with_a_line_per_resource(org, invoiced):
    lines = {line.resource: line for line in invoiced.lines.all()}
    assert set(lines) == {"gpu:a100-40gb", "storage", f"plan:test-{org.pk}", "tax"}
    gpu, storage = lines["gpu:a100-40gb"], lines["storage"]
    assert (gpu.quantity, gpu.unit, gpu.amount_minor) == (Decimal("4834.5"), "gpu_second", 387)
    assert (storage.quantity, storage.amount_minor) == (Decimal("0.666666"), 2)
    assert lines[f"plan:test-{org.pk}"].amount_minor == 1000
    assert lines["tax"].amount_minor == 248 and lines["tax"].description == "Tax at 20%"
    assert invoiced.source == Invoice.Source.BUILTIN and invoiced.status == Invoice.Status.OPEN
    assert (invoiced.period_start, invoiced.period_end) == (OCT_START, NOV_START)
    assert invoiced.issued_at is not None and invoiced.currency == "usd"
    assert (invoiced.subtotal_minor, invoiced.credits_minor, invoiced.tax_minor) == (1389, 150, 248)
    assert invoiced.total_minor == 1389 - 150 + 248 == 1487


def test_usage_lines_sum_to_the_months_ledger_to_the_cent(org, invoiced):
    ledger = (
        UsageRecord.objects.for_organization(org)
        .filter(period_end__gte=OCT_START, period_end__lt=NOV_START)
        .aggregate(total=Sum("amount_minor"))["total"]
    )
    usage_lines = invoiced.lines.filter(resource__in=["gpu:a100-40gb", "storage"])
    assert usage_lines.aggregate(total=Sum("amount_minor"))["total"] == ledger == 389
    charges = invoiced.lines.exclude(resource="tax").aggregate(total=Sum("amount_minor"))
    assert charges["total"] == invoiced.subtotal_minor


def test_credits_are_consumed_once_and_expired_ones_not_at_all(org, invoiced):
    remaining = dict(
        CreditGrant.objects.for_organization(org).values_list("reason", "remaining_minor")
    )
    assert remaining == {"welcome": 0, "expired": 500}
    audit = AuditEvent.objects.filter(organization=org, action="billing.invoice_issued")
    assert audit.get().data["total_minor"] == 1487


def test_a_second_run_issues_nothing_and_consumes_nothing(org, invoiced):
    credit_grant(organization=org, amount_minor=700, reason="later", idempotency_key="later")
    assert invoices_issue(month=OCT) == 0
    assert Invoice.objects.for_organization(org).count() == 1
    assert CreditGrant.objects.get(idempotency_key="later").remaining_minor == 700
    assert AuditEvent.objects.filter(organization=org, action="billing.invoice_issued").count() == 1


def test_credits_never_exceed_the_subtotal(org):
    _account(org, fee=1000, tax="20")
    _grant_in_october(org, 100_000, "big")
    invoices_issue(month=OCT)
    invoice = Invoice.objects.get(organization=org)
    assert (invoice.subtotal_minor, invoice.credits_minor, invoice.tax_minor) == (1000, 1000, 0)
    assert invoice.total_minor == 0
    assert CreditGrant.objects.get(idempotency_key="big").remaining_minor == 99_000


def test_tax_rounds_half_up_to_the_cent(org):
    _account(org, fee=1085, tax="10")  # 108.5 cents of tax: 109, where bankers would say 108
    invoices_issue(month=OCT)
    invoice = Invoice.objects.get(organization=org)
    assert (invoice.tax_minor, invoice.total_minor) == (109, 1194)


def test_numbers_are_unique_and_sequential_across_organizations():
    orgs = [OrganizationFactory() for _ in range(3)]
    for org in orgs:
        _gpu(org, "100", datetime(2026, 10, 5, tzinfo=UTC))
    assert invoices_issue(month=OCT) == 3
    year = timezone.now().year
    numbers = sorted(Invoice.objects.values_list("number", flat=True))
    assert numbers == [f"FS-{year}-{n:06d}" for n in (1, 2, 3)]


def test_numbering_continues_from_the_years_last_number(org, other_org):
    year = timezone.now().year
    Invoice.objects.create(
        organization=other_org,
        number=f"FS-{year}-000041",
        source=Invoice.Source.BUILTIN,
        period_start=datetime(2026, 9, 1, tzinfo=UTC),
        period_end=OCT_START,
    )
    _gpu(org, "100", datetime(2026, 10, 5, tzinfo=UTC))
    invoices_issue(month=OCT)
    assert Invoice.objects.get(organization=org).number == f"FS-{year}-000042"


def test_no_usage_and_no_fee_means_no_invoice(org, other_org):
    _account(org)
    _gpu(other_org, "100", NOV_START)  # usage, but November's
    assert invoices_issue(month=OCT) == 0
    assert not Invoice.objects.exists()


def test_a_plan_fee_alone_is_invoiced_from_the_month_the_account_existed(org, other_org):
    _account(org, fee=2500)
    late = _account(other_org, fee=2500)
    BillingAccount.objects.filter(pk=late.pk).update(created_at=NOV_START + timedelta(days=2))
    assert invoices_issue(month=OCT) == 1
    invoice = Invoice.objects.get()
    assert invoice.organization == org and invoice.total_minor == 2500


def test_with_stripe_configured_no_builtin_invoice_is_issued(org, settings):
    _account(org, fee=1000)
    _october(org)
    settings.STRIPE_SECRET_KEY = "sk_test_not_real"
    assert invoices_issue(month=OCT) == 0
    assert not Invoice.objects.exists()


def test_the_monthly_task_invoices_the_month_before(org):
    this_month = datetime.combine(billing_month(timezone.now()), datetime.min.time(), UTC)
    _gpu(org, "100", this_month - timedelta(hours=1))
    _gpu(org, "100", this_month + timedelta(seconds=1))
    assert tasks.invoices_issue() == 1
    invoice = Invoice.objects.get()
    assert invoice.period_end == this_month and invoice.subtotal_minor == 8


def test_an_operator_marks_an_open_invoice_paid_once(org, invoiced, user):
    paid = invoice_mark_paid(invoice=invoiced, actor=Actor(user=user))
    assert paid.status == Invoice.Status.PAID and paid.paid_at is not None
    assert AuditEvent.objects.filter(organization=org, action="billing.invoice_paid").count() == 1
    with pytest.raises(BillingError):
        invoice_mark_paid(invoice=invoiced, actor=Actor(user=user))


@pytest.mark.django_db(transaction=True)
def test_concurrent_runs_issue_each_invoice_once_with_gapless_numbers():
    """Each thread invoices its own organization first (racing for the next number), then runs
    the whole month (racing for every organization's invoice)."""
    orgs = [OrganizationFactory() for _ in range(6)]
    for org in orgs:
        _gpu(org, "100", datetime(2026, 10, 5, tzinfo=UTC))
    barrier = threading.Barrier(len(orgs))
    issued, errors = [], []

    def run(org):
        try:
            barrier.wait()
            issued.append(invoice_issue(organization=org, month=OCT) is not None)
            issued.append(invoices_issue(month=OCT))
        except Exception as error:  # reported by the assertion below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(org,)) for org in orgs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sum(issued) == len(orgs)
    year = timezone.now().year
    numbers = sorted(Invoice.objects.values_list("number", flat=True))
    assert numbers == [f"FS-{year}-{n:06d}" for n in range(1, len(orgs) + 1)]
    assert sorted(Invoice.objects.values_list("organization_id", flat=True)) == [o.pk for o in orgs]


# The PDF


def _assert_well_formed(pdf: bytes) -> None:
    """Every cross-reference entry points at its object, and every stream's length is right."""
    xref = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n", 1)[0])
    table = pdf[xref:].split(b"\n")
    assert table[0] == b"xref"
    count = int(table[1].split()[1])
    for number in range(1, count):
        entry = table[2 + number] + b"\n"
        assert len(entry) == 20
        assert pdf[int(entry[:10]) :].startswith(b"%d 0 obj\n" % number)
    for match in re.finditer(rb"/Length (\d+) >>\nstream\n", pdf):
        end = match.end() + int(match.group(1))
        assert pdf[end : end + 10] == b"\nendstream"
    assert pdf.endswith(b"%%EOF\n")


def test_the_pdf_shows_the_number_lines_and_total(org, invoiced):
    org.name = "Acme (Europe) \\ Ltd"
    org.save()
    pdf = invoice_pdf(invoice=Invoice.objects.get(pk=invoiced.pk))
    assert pdf.startswith(b"%PDF-")
    _assert_well_formed(pdf)
    for text in [invoiced.number, "$14.87", "$3.87", "-$1.50", "Tax at 20%", "4,834.5"]:
        assert f"({text})".encode() in pdf, text
    assert rb"(Acme \(Europe\) \\ Ltd)" in pdf


def test_a_long_invoice_runs_onto_more_pages(org):
    for n in range(80):
        _use(org, f"gpu:kind-{n}", "gpu_second", "10", datetime(2026, 10, 5, tzinfo=UTC))
    invoices_issue(month=OCT)
    pdf = invoice_pdf(invoice=Invoice.objects.get())
    _assert_well_formed(pdf)
    assert b"/Count 3" in pdf and b"(Page 3 of 3)" in pdf


# Pages and API


def test_billing_members_see_the_invoice_on_the_pages(client, org, invoiced, member_factory):
    client.force_login(member_factory(org, "billing"))
    billing = client.get(reverse("billing:billing", args=[org.slug]))
    assert invoiced.number in billing.content.decode()
    page = client.get(reverse("billing:invoice", args=[org.slug, invoiced.pk]))
    html = page.content.decode()
    assert page.status_code == 200
    assert all(text in html for text in [invoiced.number, "$14.87", "\u2212$1.50", "Tax at 20%"])
    download = client.get(reverse("billing:invoice_pdf", args=[org.slug, invoiced.pk]))
    assert download["Content-Type"] == "application/pdf"
    assert download["Content-Disposition"] == f'attachment; filename="{invoiced.number}.pdf"'
    assert download.content.startswith(b"%PDF-")


def test_a_stripe_invoice_page_links_to_stripe(client, org, owner):
    invoice = Invoice.objects.create(
        organization=org,
        source=Invoice.Source.STRIPE,
        stripe_id="in_123",
        number="ABC-0001",
        status=Invoice.Status.OPEN,
        period_start=OCT_START,
        period_end=NOV_START,
        hosted_url="https://invoice.stripe.test/i/abc",
        pdf_url="https://pay.stripe.test/abc.pdf",
    )
    client.force_login(owner)
    html = client.get(reverse("billing:invoice", args=[org.slug, invoice.pk])).content.decode()
    assert 'href="https://invoice.stripe.test/i/abc"' in html
    assert 'href="https://pay.stripe.test/abc.pdf"' in html


def test_pages_refuse_a_developer_and_hide_other_organizations(
    client, org, other_org, invoiced, member_factory
):
    client.force_login(member_factory(org, "developer"))
    for name in ["billing:invoice", "billing:invoice_pdf"]:
        assert client.get(reverse(name, args=[org.slug, invoiced.pk])).status_code == 403
    client.force_login(member_factory(other_org, "owner"))
    for name in ["billing:invoice", "billing:invoice_pdf"]:
        assert client.get(reverse(name, args=[other_org.slug, invoiced.pk])).status_code == 404


def test_the_api_lists_shows_and_downloads_invoices(org, invoiced, member_factory, key_client_for):
    client = key_client_for(member_factory(org, "billing"), org)
    base = f"/api/v1/orgs/{org.slug}/billing/invoices/"
    listed = client.get(base).json()["results"]
    assert [(i["number"], i["total_minor"]) for i in listed] == [(invoiced.number, 1487)]
    detail = client.get(f"{base}{invoiced.pk}/").json()
    assert [line["amount_minor"] for line in detail["lines"]] == [387, 2, 1000, 248]
    assert detail["lines"][0]["quantity"] == "4834.500000"
    for accept in ["*/*", "application/pdf"]:
        pdf = client.get(f"{base}{invoiced.pk}/pdf/", HTTP_ACCEPT=accept)
        assert pdf.status_code == 200 and pdf["Content-Type"] == "application/pdf"
        assert pdf.content.startswith(b"%PDF-") and invoiced.number.encode() in pdf.content


def test_the_api_refuses_a_developer_and_hides_other_organizations(
    org, other_org, invoiced, member_factory, client_for
):
    developer = client_for(member_factory(org, "developer"))
    base = f"/api/v1/orgs/{org.slug}/billing/invoices/"
    for url in [base, f"{base}{invoiced.pk}/", f"{base}{invoiced.pk}/pdf/"]:
        assert developer.get(url).status_code == 403
    outsider = client_for(member_factory(other_org, "owner"))
    own = f"/api/v1/orgs/{other_org.slug}/billing/invoices/"
    assert outsider.get(own).json()["results"] == []
    assert outsider.get(f"{own}{invoiced.pk}/").status_code == 404
    missing = outsider.get(f"{own}{invoiced.pk}/pdf/", HTTP_ACCEPT="application/pdf")
    assert missing.status_code == 404
    assert missing["Content-Type"] == "application/json" and missing.json()["code"] == "not_found"


def test_a_row_recorded_after_its_month_was_invoiced_goes_on_the_next_invoice(org):
    _account(org)
    _gpu(org, "1000", datetime(2026, 10, 5, tzinfo=UTC))  # 80 cents
    assert invoices_issue(month=OCT) == 1
    # An attempt reaped on 1 November whose usage ended on 31 October.
    _use(
        org,
        "gpu:a100-40gb",
        "gpu_second",
        "500",
        datetime(2026, 10, 31, 23, 59, tzinfo=UTC),
        recorded=NOV_START + timedelta(minutes=10),
    )
    assert invoices_issue(month=OCT) == 0
    assert invoices_issue(month=date(2026, 11, 1)) == 1
    totals = dict(
        Invoice.objects.for_organization(org).values_list("period_start", "subtotal_minor")
    )
    assert totals == {OCT_START: 80, NOV_START: 40}
