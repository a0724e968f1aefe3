"""An invitee follows the e-mailed link in a real browser, signs in on the way, and joins.

The token rides in the link's fragment: the test records the path, query and Referer of every
request the server received and proves none carried it, while the page's script still got it
into the accept form, which posts it in the body.
"""

from __future__ import annotations

import re

import pytest
from django.core.signals import request_started
from playwright.sync_api import expect

from tenants.actors import Actor
from tenants.models import Membership
from tenants.scopes import Role
from tenants.services import invitation_create
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory
from tests.tenants.invitations import invitation_link

browser_test = pytest.mark.django_db(transaction=True)

PASSWORD = "a-long-and-unusual-passphrase-42"


@pytest.fixture
def server_saw():
    """What reaches access logs: each request's path, query string and Referer."""
    seen: list[str] = []

    def record(sender, environ, **kwargs):
        seen.append(
            " ".join(environ.get(k, "") for k in ("PATH_INFO", "QUERY_STRING", "HTTP_REFERER"))
        )

    request_started.connect(record)
    yield seen
    request_started.disconnect(record)


@browser_test
def test_an_invitee_signs_in_from_the_link_and_joins_without_the_token_reaching_the_server(
    live_server, page, settings, server_saw
):
    settings.SITE_URL = live_server.url
    org = OrganizationFactory(name="Grace Lab")
    owner = MembershipFactory(organization=org, role=Role.OWNER).user
    invitation_create(
        organization=org, email="pat@example.com", role=Role.DEVELOPER, actor=Actor(user=owner)
    )
    link = invitation_link("pat@example.com")
    token = link.rsplit("#", 1)[1]
    pat = UserFactory(email="pat@example.com", password=PASSWORD)

    page.goto(link)
    # The script keeps the token for the tab and clears it from the address bar.
    expect(page).to_have_url(f"{live_server.url}/invitations/accept/")
    page.screens("invitation-signed-out")
    page.get_by_role("button", name="Sign in").click()
    page.fill("input[name=login]", "pat@example.com")
    page.fill("input[name=password]", PASSWORD)
    page.locator("main form button[type=submit]").click()

    expect(page).to_have_url(re.compile(r"/invitations/accept/$"))
    expect(page.locator("input[name=token]")).to_have_value(token)
    page.screens("invitation-accept")
    page.get_by_role("button", name="Accept and join").click()

    expect(page.locator("h1")).to_have_text("Grace Lab")
    assert Membership.objects.get(organization=org, user=pat).role == Role.DEVELOPER
    assert any("/invitations/accept/" in line for line in server_saw)
    assert [line for line in server_saw if token in line] == []
    assert not [line for line in page.console if "error" in line.lower()], page.console
