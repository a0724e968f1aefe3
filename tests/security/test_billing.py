"""Billing, attacked: Stripe's Checkout and Portal send the browser back only to this site.

An attacker with `billing:admin` (a key, say) who opens a Checkout session whose return address
is theirs gets a genuine Stripe page that sends the victim to a look-alike site afterwards."""

import pytest

from tenants.scopes import Role
from tests.billing.stripe_server import StripeServer
from tests.factories import MembershipFactory, OrganizationFactory

pytestmark = pytest.mark.django_db

SITE = "https://site.example"

HOSTILE = [
    "https://evil.example/",
    "https://site.example.evil.com/billing",
    "https://evil.com/https://site.example/",
    "//evil.com/",
    "https://site.example@evil.com/",
    "https://user:pass@site.example/",
    "http://site.example/",  # downgraded scheme
    "https://site.example:8443/",  # another port, another server
    "javascript:alert(document.cookie)",
    "JavaScript://site.example/%0aalert(1)",
    "data:text/html,<script>alert(1)</script>",
    "https://site.example\\@evil.com/",
    "https://site.example\\evil.com/",
    "https://site.example\t.evil.com/",
    "/o/acme/billing/",  # relative: Stripe needs an absolute address
]


@pytest.fixture
def fake_stripe(settings):
    server = StripeServer().start()
    settings.STRIPE_SECRET_KEY = server.fake.api_key
    settings.STRIPE_API_BASE = server.url
    settings.STRIPE_TIMEOUT_S = 2.0
    yield server.fake
    server.stop()


@pytest.fixture
def owner_client(settings, client_for):
    settings.SITE_URL = SITE
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER).user
    return org, client_for(owner)


@pytest.mark.parametrize("address", HOSTILE)
@pytest.mark.parametrize(
    ("name", "field"),
    [("checkout", "success_url"), ("checkout", "cancel_url"), ("portal", "return_url")],
)
def test_stripe_pages_refuse_to_send_the_browser_off_site(
    fake_stripe, owner_client, name, field, address
):
    org, client = owner_client

    response = client.post(
        f"/api/v1/orgs/{org.slug}/billing/{name}/", {field: address}, format="json"
    )

    assert response.status_code == 400, response.content
    body = response.json()
    assert field in body["fields"], body
    sessions = {("POST", "/v1/checkout/sessions"), ("POST", "/v1/billing_portal/sessions")}
    assert sessions.isdisjoint(fake_stripe.requests)


@pytest.mark.parametrize(
    "address",
    [f"{SITE}/o/acme/billing/?payment=saved", f"{SITE}/", "https://SITE.example:443/o/x/"],
)
def test_addresses_on_this_site_are_accepted(fake_stripe, owner_client, address):
    org, client = owner_client

    response = client.post(
        f"/api/v1/orgs/{org.slug}/billing/checkout/",
        {"success_url": address, "cancel_url": address},
        format="json",
    )

    assert response.status_code == 200, response.content
    [session] = fake_stripe.objects["checkout_session"].values()
    assert session["success_url"] == address


def test_a_site_under_a_path_accepts_only_addresses_under_that_path(
    fake_stripe, settings, owner_client
):
    org, client = owner_client
    settings.SITE_URL = f"{SITE}/app/"
    url = f"/api/v1/orgs/{org.slug}/billing/portal/"

    for outside in (f"{SITE}/", f"{SITE}/application", f"{SITE}/app/../admin/"):
        refused = client.post(url, {"return_url": outside}, format="json")
        assert refused.status_code == 400, outside
    accepted = client.post(url, {"return_url": f"{SITE}/app/o/acme/"}, format="json")
    assert accepted.status_code == 200, accepted.content
