"""The dashboard as a person uses it: sign up, organizations, members, keys, audit."""

import re
from urllib.parse import urlsplit

import pytest
from django.core import mail
from django.urls import reverse

from tenants.models import ApiKey, Invitation, Membership, Organization
from tests.factories import TEST_PASSWORD, UserFactory
from tests.tenants.invitations import invitation_link

pytestmark = pytest.mark.django_db


def test_sign_up_verify_email_and_create_a_first_organization(client):
    response = client.post(
        reverse("account_signup"),
        {
            "email": "new@example.test",
            "password1": "a-long-pass-phrase",
            "password2": "a-long-pass-phrase",
        },
    )
    assert response.status_code == 302
    assert len(mail.outbox) == 1
    confirm_url = re.search(r"https?://\S+/accounts/confirm-email/\S+/", mail.outbox[0].body).group(
        0
    )
    path = "/" + confirm_url.split("/", 3)[3]
    assert client.post(path).status_code == 302
    home = client.get(reverse("dashboard:home"))
    assert home["Location"] == reverse("tenants:organization_create")
    created = client.post(reverse("tenants:organization_create"), {"name": "Rocket Lab"})
    assert created["Location"] == reverse("tenants:overview", args=["rocket-lab"])
    page = client.get(created["Location"])
    assert b"Rocket Lab" in page.content and b"organization.create" in page.content


def test_login_is_refused_until_the_email_is_verified(client):
    user = UserFactory()
    user.emailaddress_set.update(verified=False)
    response = client.post(
        reverse("account_login"), {"login": user.email, "password": TEST_PASSWORD}
    )
    assert response.status_code == 302 and "confirm-email" in response["Location"]
    assert client.get(reverse("tenants:profile")).status_code == 302


def test_repeated_failed_logins_for_one_account_are_throttled(client):
    user = UserFactory()
    throttled = b"Too many failed login attempts"
    replies = [
        client.post(reverse("account_login"), {"login": user.email, "password": "wrong"}).content
        for _ in range(6)
    ]
    assert [throttled in reply for reply in replies] == [False] * 5 + [True]
    # Even the right password is refused while the account is throttled, from any address.
    right = client.post(
        reverse("account_login"),
        {"login": user.email, "password": TEST_PASSWORD},
        REMOTE_ADDR="198.51.100.9",
    )
    assert right.status_code == 200 and throttled in right.content
    assert not right.wsgi_request.user.is_authenticated


def test_admin_login_goes_through_the_throttled_form(client):
    response = client.get("/admin/login/?next=/admin/")
    assert response.status_code == 302
    assert response["Location"] == reverse("account_login") + "?next=/admin/"


def test_admin_is_for_staff_only(client, owner):
    client.force_login(owner)
    assert client.get("/admin/").status_code == 302
    owner.is_staff = owner.is_superuser = True
    owner.save()
    assert client.get("/admin/").status_code == 200
    for model in ("organization", "membership", "invitation", "apikey", "auditevent", "user"):
        assert client.get(f"/admin/tenants/{model}/").status_code == 200, model


def test_switching_organizations_through_the_navigation(
    client, org, other_org, owner, member_factory
):
    member_factory(other_org, "viewer", user=owner)
    client.force_login(owner)
    page = client.get(reverse("tenants:overview", args=[other_org.slug]))
    assert page.context["current_organization"] == other_org
    assert set(page.context["user_organizations"]) == {org, other_org}
    assert client.get(reverse("dashboard:home"))["Location"] == reverse(
        "tenants:overview", args=[other_org.slug]
    )


def test_inviting_and_accepting_through_the_pages(
    client, org, owner, django_capture_on_commit_callbacks
):
    client.force_login(owner)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            reverse("tenants:members", args=[org.slug]),
            {"email": "pat@example.test", "role": "developer"},
        )
    assert response.status_code == 302
    link = urlsplit(invitation_link("pat@example.test"))
    pat = UserFactory(email="pat@example.test")
    client.force_login(pat)
    assert b"Accept and join" in client.get(link.path).content
    accepted = client.post(link.path, {"token": link.fragment})
    assert accepted["Location"] == reverse("tenants:overview", args=[org.slug])
    assert Membership.objects.get(organization=org, user=pat).role == "developer"
    assert Invitation.objects.get(email="pat@example.test").accepted_by == pat


def test_the_invite_form_offers_only_the_roles_one_may_hand_on(client, org, member_factory):
    client.force_login(member_factory(org, "admin"))
    form = client.get(reverse("tenants:members", args=[org.slug])).context["form"]
    assert [value for value, _label in form.fields["role"].choices] == [
        "admin",
        "developer",
        "viewer",
    ]


def test_the_invitation_page_sends_a_signed_out_reader_to_sign_in_and_back(client):
    page = client.get(reverse("tenants:invitation_accept"))
    assert page.status_code == 200
    assert b"?next=/invitations/accept/" in page.content and b"js/invitation.js" in page.content
    posted = client.post(reverse("tenants:invitation_accept"), {"token": "anything"})
    assert posted["Location"].startswith(reverse("account_login"))


def test_a_wrong_invitation_code_is_a_400_that_says_so(client, user):
    client.force_login(user)
    response = client.post(reverse("tenants:invitation_accept"), {"token": "not-a-token"})
    assert response.status_code == 400 and b"not valid" in response.content


def test_invalid_invite_keeps_the_input_and_says_what_is_wrong(client, org, owner):
    client.force_login(owner)
    response = client.post(
        reverse("tenants:members", args=[org.slug]), {"email": "nope", "role": "developer"}
    )
    assert response.status_code == 400
    assert b'value="nope"' in response.content and b"valid email" in response.content


def test_api_key_secret_is_shown_once(client, org, owner):
    client.force_login(owner)
    response = client.post(
        reverse("tenants:api_keys", args=[org.slug]), {"name": "ci", "scopes": ["org:read"]}
    )
    assert response.status_code == 201
    token = response.context["token"]
    assert token.encode() in response.content
    again = client.get(reverse("tenants:api_keys", args=[org.slug]))
    assert (
        token.encode() not in again.content
        and ApiKey.objects.get().prefix.encode() in again.content
    )


def test_key_form_offers_only_the_members_scopes(client, org, member_factory):
    viewer = member_factory(org, "viewer")
    client.force_login(viewer)
    form = client.get(reverse("tenants:api_keys", args=[org.slug])).context["form"]
    offered = {value for value, _label in form.fields["scopes"].choices}
    assert "jobs:read" in offered and "jobs:write" not in offered
    response = client.post(
        reverse("tenants:api_keys", args=[org.slug]), {"name": "x", "scopes": ["jobs:write"]}
    )
    assert response.status_code == 400 and not ApiKey.objects.exists()


def test_revoking_a_key_from_the_page(client, org, owner):
    client.force_login(owner)
    client.post(
        reverse("tenants:api_keys", args=[org.slug]), {"name": "ci", "scopes": ["org:read"]}
    )
    key = ApiKey.objects.get()
    response = client.post(reverse("tenants:api_key_revoke", args=[org.slug, key.pk]))
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_owner_changes_a_role_and_cannot_demote_the_last_owner(client, org, owner, member_factory):
    dev = member_factory(org, "developer")
    client.force_login(owner)
    dev_membership = Membership.objects.get(user=dev)
    client.post(
        reverse("tenants:member_role", args=[org.slug, dev_membership.pk]), {"role": "admin"}
    )
    assert Membership.objects.get(user=dev).role == "admin"
    own = Membership.objects.get(user=owner)
    response = client.post(
        reverse("tenants:member_role", args=[org.slug, own.pk]), {"role": "viewer"}, follow=True
    )
    assert b"last owner" in response.content
    assert Membership.objects.get(user=owner).role == "owner"


def test_audit_log_page_filters(client, org, owner):
    client.force_login(owner)
    client.post(reverse("tenants:settings", args=[org.slug]), {"name": "Renamed Org"})
    page = client.get(reverse("tenants:audit", args=[org.slug]), {"action": "organization.update"})
    assert [e.action for e in page.context["page"]] == ["organization.update"]
    assert Organization.objects.get(pk=org.pk).name == "Renamed Org"


def test_pages_refer_only_to_vendored_assets(client, owner, org):
    client.force_login(owner)
    html = client.get(reverse("tenants:overview", args=[org.slug])).content.decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(not s.startswith(("http:", "https:", "//")) for s in sources)


def test_organization_names_with_control_characters_are_refused_on_the_pages(client, org, owner):
    client.force_login(owner)
    original, name = org.name, "Acme\nBcc: everyone@victim.test"
    created = client.post(reverse("tenants:organization_create"), {"name": name})
    assert created.status_code == 400
    assert "control characters" in created.content.decode()
    assert Membership.objects.filter(user=owner).count() == 1
    renamed = client.post(reverse("tenants:settings", args=[org.slug]), {"name": name})
    assert renamed.status_code == 400
    assert "control characters" in renamed.content.decode()
    org.refresh_from_db()
    assert org.name == original
