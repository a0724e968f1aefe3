"""Handing on permissions in the tenants app, attacked through the API and the pages.

Each test is the attack as an outsider, an admin or a leaked key would run it: inviting or
promoting into scopes the attacker lacks, reading the invitation token from a response, minting
a key that outlives its parent, finding tokens in URL paths, accepting from an unverified address.
"""

from urllib.parse import urlsplit

import pytest
from django.core import mail
from django.urls import reverse
from rest_framework.test import APIClient

from outbox.models import Message
from outbox.services import outbox_drain
from tenants.actors import Actor
from tenants.models import ApiKey, Invitation, Membership
from tenants.scopes import ROLE_SCOPES, Role
from tenants.selectors import membership_get
from tenants.services import api_key_create
from tests.factories import UserFactory
from tests.tenants.invitations import invitation_link, invitation_token, invite

pytestmark = pytest.mark.django_db

OWNER_SCOPES_BUT_MEMBERS_OWNER = sorted(ROLE_SCOPES[Role.OWNER] - {"members:owner"})


def _no_mail_owed():
    """Mail leaves only through the outbox: no message is owed, and draining it sends none."""
    assert list(Message.objects.values_list("handler", "payload")) == []
    outbox_drain()
    assert mail.outbox == []


def _invite(client, org, email, role):
    return client.post(
        f"/api/v1/orgs/{org.slug}/invitations/", {"email": email, "role": role}, format="json"
    )


def _change_role(client, org, member, role):
    membership = membership_get(organization=org, user=member)
    return client.patch(
        f"/api/v1/orgs/{org.slug}/members/{membership.pk}/", {"role": role}, format="json"
    )


@pytest.mark.parametrize(
    "key_scopes",
    [["members:admin"], ["members:admin", "members:read"], OWNER_SCOPES_BUT_MEMBERS_OWNER],
    ids=["members-admin", "members-admin-and-read", "all-but-members-owner"],
)
def test_a_key_without_members_owner_cannot_invite_an_outsider_as_owner(
    org, owner, key_client_for, key_scopes
):
    response = _invite(
        key_client_for(owner, org, key_scopes), org, "attacker@evil.test", Role.OWNER
    )
    assert response.status_code == 403, response.content
    assert response.json()["code"] == "permission_denied"
    assert not Invitation.objects.filter(email="attacker@evil.test").exists()
    _no_mail_owed()


def test_a_key_cannot_invite_into_a_role_wider_than_its_own_scopes(org, owner, key_client_for):
    # Enough to invite, and every developer scope but one: the developer role is still wider.
    scopes = ["members:admin", *sorted(ROLE_SCOPES[Role.DEVELOPER] - {"models:promote"})]
    response = _invite(key_client_for(owner, org, scopes), org, "dev@evil.test", Role.DEVELOPER)
    assert response.status_code == 403, response.content
    assert "models:promote" in response.json()["detail"]
    assert not Invitation.objects.filter(email="dev@evil.test").exists()


def test_an_admin_cannot_invite_a_second_address_of_theirs_as_billing(
    org, owner, member_factory, client_for
):
    admin = member_factory(org, Role.ADMIN)
    response = _invite(client_for(admin), org, "admin.alt@example.test", Role.BILLING)
    assert response.status_code == 403, response.content
    assert "billing:admin" in response.json()["detail"]
    assert not Invitation.objects.filter(email="admin.alt@example.test").exists()
    # What the admin holds, the admin may hand on.
    assert _invite(client_for(admin), org, "dev@example.test", Role.DEVELOPER).status_code == 201


def test_an_admin_cannot_invite_as_billing_through_the_members_page(
    client, org, owner, member_factory
):
    admin = member_factory(org, Role.ADMIN)
    client.force_login(admin)
    response = client.post(
        reverse("tenants:members", args=[org.slug]),
        {"email": "admin.alt@example.test", "role": Role.BILLING},
    )
    assert response.status_code == 400
    assert not Invitation.objects.filter(email="admin.alt@example.test").exists()
    _no_mail_owed()


@pytest.mark.parametrize("new_role", [Role.OWNER, Role.BILLING, Role.ADMIN])
def test_a_key_narrowed_to_members_owner_cannot_promote_beyond_its_scopes(
    org, owner, member_factory, key_client_for, new_role
):
    accomplice = member_factory(org, Role.VIEWER)
    keyed = key_client_for(owner, org, ["members:owner", "members:read"])
    response = _change_role(keyed, org, accomplice, new_role)
    assert response.status_code == 403, response.content
    assert membership_get(organization=org, user=accomplice).role == Role.VIEWER


def test_a_key_narrowed_to_members_owner_cannot_demote_or_remove_an_owner(
    org, owner, member_factory, key_client_for
):
    other_owner = member_factory(org, Role.OWNER)
    keyed = key_client_for(owner, org, ["members:owner", "members:read"])
    assert _change_role(keyed, org, other_owner, Role.VIEWER).status_code == 403
    membership = membership_get(organization=org, user=other_owner)
    removed = keyed.delete(f"/api/v1/orgs/{org.slug}/members/{membership.pk}/")
    assert removed.status_code == 403
    assert Membership.objects.get(pk=membership.pk).role == Role.OWNER


def test_a_key_narrowed_to_members_admin_cannot_change_roles(
    org, owner, member_factory, key_client_for
):
    accomplice = member_factory(org, Role.VIEWER)
    keyed = key_client_for(owner, org, ["members:admin", "members:read"])
    assert _change_role(keyed, org, accomplice, Role.DEVELOPER).status_code == 403
    assert membership_get(organization=org, user=accomplice).role == Role.VIEWER


def test_an_admin_cannot_promote_anyone_through_the_api_or_the_members_page(
    client, org, owner, member_factory, client_for
):
    admin = member_factory(org, Role.ADMIN)
    accomplice = member_factory(org, Role.VIEWER)
    assert _change_role(client_for(admin), org, accomplice, Role.BILLING).status_code == 403
    client.force_login(admin)
    membership = membership_get(organization=org, user=accomplice)
    page = client.post(
        reverse("tenants:member_role", args=[org.slug, membership.pk]), {"role": Role.BILLING}
    )
    assert page.status_code == 403
    assert membership_get(organization=org, user=accomplice).role == Role.VIEWER


def test_the_invitation_response_does_not_hand_out_the_token(
    org, owner, client_for, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = _invite(client_for(owner), org, "friend@example.test", Role.VIEWER)
    assert response.status_code == 201
    token = invitation_token("friend@example.test")
    assert token.encode() not in response.content
    assert "accept_url" not in response.json()
    listed = client_for(owner).get(f"/api/v1/orgs/{org.slug}/invitations/")
    assert token.encode() not in listed.content
    page = client_for(owner).get(reverse("tenants:members", args=[org.slug]))
    assert page.status_code == 200 and token.encode() not in page.content


def test_an_api_key_cannot_mint_a_key_that_outlives_it(org, owner, client_for, key_client_for):
    parent = key_client_for(owner, org)
    minted = parent.post(
        f"/api/v1/orgs/{org.slug}/api-keys/",
        {"name": "persistence", "scopes": ["org:read"]},
        format="json",
    )
    # The owner finds the leaked parent key and revokes it.
    parent_key = ApiKey.objects.get(name="test key")
    client_for(owner).delete(f"/api/v1/orgs/{org.slug}/api-keys/{parent_key.pk}/")
    child_token = minted.json().get("key")
    child = APIClient()
    child.credentials(HTTP_AUTHORIZATION=f"Bearer {child_token}")
    survives = child_token is not None and child.get(f"/api/v1/orgs/{org.slug}/").status_code
    assert (minted.status_code, survives) == (403, False), minted.content
    assert minted.json()["code"] == "permission_denied"
    assert list(ApiKey.objects.values_list("name", flat=True)) == ["test key"]


def test_no_page_creates_a_key_for_a_bearer_token(client, org, owner):
    _key, token = api_key_create(
        organization=org,
        name="leaked",
        scopes=sorted(ROLE_SCOPES[Role.OWNER]),
        actor=Actor(user=owner),
    )
    response = client.post(
        reverse("tenants:api_keys", args=[org.slug]),
        {"name": "minted", "scopes": ["org:read"]},
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("account_login"))
    assert not ApiKey.objects.filter(name="minted").exists()


def test_the_invitation_token_travels_only_in_the_links_fragment(client, org, owner):
    _invitation, token = invite(
        organization=org, email="pat@example.test", role=Role.DEVELOPER, actor=Actor(user=owner)
    )
    link = urlsplit(invitation_link("pat@example.test"))
    # The path and query reach access logs and Referer headers; a fragment never leaves the browser.
    assert token not in link.path and token not in link.query
    assert link.fragment == token
    pat = UserFactory(email="pat@example.test")
    client.force_login(pat)
    assert client.get(f"/invitations/{token}/").status_code == 404
    assert client.get(link.path).status_code == 200
    accepted = client.post(link.path, {"token": token})
    assert accepted["Location"] == reverse("tenants:overview", args=[org.slug])
    assert membership_get(organization=org, user=pat).role == Role.DEVELOPER


def test_signing_up_with_the_invited_address_without_verifying_it_cannot_accept(
    client, org, owner, settings
):
    # Where verification is optional, a sign-up is signed in at once, mailbox or not.
    settings.ACCOUNT_EMAIL_VERIFICATION = "optional"
    _invitation, token = invite(
        organization=org, email="cfo@example.test", role=Role.BILLING, actor=Actor(user=owner)
    )
    signed_up = client.post(
        reverse("account_signup"),
        {
            "email": "cfo@example.test",
            "password1": "a-long-pass-phrase",
            "password2": "a-long-pass-phrase",
        },
    )
    assert signed_up.status_code == 302
    response = client.post(
        "/api/v1/invitations/accept/", {"token": token}, content_type="application/json"
    )
    assert response.status_code == 403, response.content
    assert response.json()["code"] == "email_unverified"
    assert "cfo@example.test" in response.json()["detail"]
    assert not Membership.objects.filter(organization=org, user__email="cfo@example.test").exists()


def test_a_user_whose_invited_address_is_unverified_cannot_accept_on_the_page(client, org, owner):
    _invitation, token = invite(
        organization=org, email="late@example.test", role=Role.ADMIN, actor=Actor(user=owner)
    )
    user = UserFactory(email="late@example.test")
    user.emailaddress_set.update(verified=False)
    client.force_login(user)
    response = client.post(urlsplit(invitation_link("late@example.test")).path, {"token": token})
    assert response.status_code == 403
    assert b"Confirm late@example.test" in response.content
    assert not Membership.objects.filter(organization=org, user=user).exists()
