"""Checkout and the Billing Portal, through the API and the billing page; without Stripe, a clear
error and the built-in ledger."""

import json

import pytest
from django.urls import reverse

from billing import selectors
from outbox.services import outbox_drain
from tenants.scopes import Role
from tests.factories import MembershipFactory, OrganizationFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner_in(db):
    org = OrganizationFactory()
    return org, MembershipFactory(organization=org, role=Role.OWNER).user


def api(org, name):
    return f"/api/v1/orgs/{org.slug}/billing/{name}/"


def page(org, name):
    return f"/o/{org.slug}/billing/{name}/"


def test_checkout_returns_a_setup_session_url_for_the_orgs_customer(
    fake_stripe, owner_in, client_for, settings
):
    org, owner = owner_in
    settings.SITE_URL = "https://app.example"

    response = client_for(owner).post(
        api(org, "checkout"), {"success_url": "https://app.example/ok"}, format="json"
    )

    assert response.status_code == 200, response.content
    [session] = fake_stripe.objects["checkout_session"].values()
    assert response.json()["url"] == session["url"]
    assert session["url"].startswith("https://checkout.stripe.test/")
    assert (session["mode"], session["success_url"]) == ("setup", "https://app.example/ok")
    customer_id = selectors.billing_account_get(organization=org).stripe_customer_id
    assert session["customer"] == customer_id
    assert f"customer-org-{org.pk}" in fake_stripe.idempotent  # one customer per organization


def test_checkout_defaults_to_returning_to_the_billing_page(
    fake_stripe, owner_in, client_for, settings
):
    org, owner = owner_in
    settings.SITE_URL = "https://app.example/"
    client = client_for(owner)

    client.post(api(org, "checkout"), {}, format="json")
    client.post(api(org, "checkout"), {}, format="json")

    # One customer for the organization however often it checks out.
    assert len(fake_stripe.objects["customer"]) == 1
    billing_page = "https://app.example" + reverse("billing:billing", args=[org.slug])
    sessions = list(fake_stripe.objects["checkout_session"].values())
    assert len(sessions) == 2
    assert {(s["success_url"], s["cancel_url"]) for s in sessions} == {(billing_page, billing_page)}


def test_portal_returns_a_session_url(fake_stripe, owner_in, client_for, settings):
    org, owner = owner_in
    settings.SITE_URL = "https://app.example"

    response = client_for(owner).post(
        api(org, "portal"), {"return_url": "https://app.example/billing"}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["url"].startswith("https://billing.stripe.test/p/session/")


@pytest.mark.parametrize("name", ["checkout", "portal"])
def test_without_stripe_the_api_says_so_clearly(no_stripe, owner_in, client_for, name):
    org, owner = owner_in

    response = client_for(owner).post(api(org, name), {}, format="json")

    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "stripe_not_configured"
    assert "built-in ledger" in body["detail"]


def test_stripe_failing_is_a_503_with_a_message_not_a_500(fake_stripe, owner_in, client_for):
    org, owner = owner_in
    fake_stripe.fail_next(1)

    response = client_for(owner).post(api(org, "portal"), {}, format="json")

    assert response.status_code == 503
    assert response.json()["code"] == "stripe_unavailable"


def test_a_developer_may_not_open_checkout(fake_stripe, owner_in, client_for):
    org, _owner = owner_in
    developer = MembershipFactory(organization=org, role=Role.DEVELOPER).user
    assert client_for(developer).post(api(org, "checkout"), {}, format="json").status_code == 403
    assert fake_stripe.requests == []


@pytest.mark.parametrize(
    ("name", "prefix"),
    [("checkout", "https://checkout.stripe.test/"), ("portal", "https://billing.stripe.test/")],
)
def test_page_actions_redirect_to_stripe(fake_stripe, owner_in, client, name, prefix):
    org, owner = owner_in
    client.force_login(owner)

    response = client.post(page(org, name))

    assert response.status_code == 302
    assert response["Location"].startswith(prefix)


def test_page_action_without_stripe_returns_to_the_billing_page_with_a_message(
    no_stripe, owner_in, client
):
    org, owner = owner_in
    client.force_login(owner)

    response = client.post(page(org, "checkout"), follow=True)

    assert response.redirect_chain[-1][0] == reverse("billing:billing", args=[org.slug])
    assert b"not configured" in response.content


def test_billing_page_shows_the_payment_buttons_with_stripe(fake_stripe, owner_in, client):
    org, owner = owner_in
    client.force_login(owner)

    html = client.get(reverse("billing:billing", args=[org.slug])).content.decode()

    assert page(org, "checkout") in html
    assert page(org, "portal") in html
    assert "built-in ledger" not in html


def test_billing_page_without_stripe_says_the_ledger_invoices(no_stripe, owner_in, client):
    org, owner = owner_in
    client.force_login(owner)

    html = client.get(reverse("billing:billing", args=[org.slug])).content.decode()

    assert "invoices come from the built-in ledger" in html
    assert page(org, "checkout") not in html


def test_a_card_saved_through_checkout_becomes_the_invoice_default(
    fake_stripe, owner_in, client_for, client
):
    org, owner = owner_in
    client_for(owner).post(api(org, "checkout"), {}, format="json")
    [session] = fake_stripe.objects["checkout_session"]
    completed = fake_stripe.checkout_complete(session)
    event = fake_stripe.event("checkout.session.completed", completed, created=1_790_000_000)
    body = json.dumps(event).encode()

    response = client.post(
        "/billing/stripe/webhook/",
        data=body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=fake_stripe.sign(body),
    )

    assert response.status_code == 200
    assert ("GET", f"/v1/setup_intents/{completed['setup_intent']}") not in fake_stripe.requests
    # The worker's part, here in the test process: the subscription owed when Checkout opened
    # the account, and the follow-up.
    assert outbox_drain() == 2
    customer_id = selectors.billing_account_get(organization=org).stripe_customer_id
    customer = fake_stripe.objects["customer"][customer_id]
    saved = fake_stripe.objects["setup_intent"][completed["setup_intent"]]["payment_method"]
    assert customer["invoice_settings"] == {"default_payment_method": saved}
