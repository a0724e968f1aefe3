"""The tenants API through HTTP: keys, errors, pagination, invitations, audit filters."""

from datetime import timedelta

import pytest
from django.utils import timezone

from tenants.actors import Actor
from tenants.models import ApiKey, AuditEvent, Membership, Organization
from tenants.services import api_key_create
from tests.factories import AuditEventFactory, UserFactory
from tests.tenants.invitations import invitation_token, invite

pytestmark = pytest.mark.django_db


def _bearer(client, token):
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_key_is_shown_once_and_works_until_revoked(org, owner, client_for, api_client):
    session = client_for(owner)
    created = session.post(
        f"/api/v1/orgs/{org.slug}/api-keys/",
        {"name": "ci", "scopes": ["members:read"]},
        format="json",
    )
    assert created.status_code == 201
    token = created.json()["key"]
    listed = session.get(f"/api/v1/orgs/{org.slug}/api-keys/").json()["results"]
    assert "key" not in listed[0] and listed[0]["prefix"] == token.split("_")[0]

    keyed = _bearer(api_client, token)
    assert keyed.get(f"/api/v1/orgs/{org.slug}/members/").status_code == 200
    assert (
        session.delete(f"/api/v1/orgs/{org.slug}/api-keys/{created.json()['id']}/").status_code
        == 204
    )
    response = keyed.get(f"/api/v1/orgs/{org.slug}/members/")
    assert response.status_code == 401
    assert response.json() == {
        "code": "authentication_failed",
        "detail": "This API key was revoked.",
    }


def test_expired_and_malformed_keys_are_401(org, owner, api_client):
    key, token = api_key_create(
        organization=org, name="k", scopes=["org:read"], actor=Actor(user=owner)
    )
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert _bearer(api_client, token).get(f"/api/v1/orgs/{org.slug}/").status_code == 401
    assert _bearer(api_client, "nonsense").get(f"/api/v1/orgs/{org.slug}/").status_code == 401
    response = _bearer(api_client, "a b c").get(f"/api/v1/orgs/{org.slug}/")
    assert response.status_code == 401 and response["WWW-Authenticate"] == "Bearer"


def test_a_forged_secret_a_nul_in_the_prefix_and_a_deactivated_creator_are_401(
    org, owner, api_client
):
    key, token = api_key_create(
        organization=org, name="k", scopes=["org:read"], actor=Actor(user=owner)
    )
    url = f"/api/v1/orgs/{org.slug}/"
    assert _bearer(api_client, token).get(url).status_code == 200
    forged = f"{key.prefix}_{'0' * (len(token) - len(key.prefix) - 1)}"
    assert _bearer(api_client, forged).get(url).status_code == 401
    # PostgreSQL text cannot hold NUL: the lookup must refuse it, not fail with a 500.
    assert _bearer(api_client, f"{key.prefix}\x00_{token}").get(url).status_code == 401
    owner.is_active = False
    owner.save(update_fields=["is_active"])
    response = _bearer(api_client, token).get(url)
    assert response.status_code == 401 and response.json()["detail"] == "The API key is not valid."


def test_a_key_reaches_only_its_own_organization(
    org, other_org, owner, member_factory, key_client_for
):
    member_factory(other_org, "owner", user=owner)
    client = key_client_for(owner, org)
    assert [o["slug"] for o in client.get("/api/v1/orgs/").json()] == [org.slug]
    assert client.get(f"/api/v1/orgs/{other_org.slug}/").status_code == 404
    assert client.post("/api/v1/orgs/", {"name": "Nope"}, format="json").status_code == 403


def test_malformed_json_is_a_400_with_a_code(org, owner, client_for):
    response = client_for(owner).post(
        f"/api/v1/orgs/{org.slug}/invitations/", "{not json", content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["code"] == "parse_error"


def test_invalid_fields_are_reported_per_field(org, owner, client_for):
    response = client_for(owner).post(
        f"/api/v1/orgs/{org.slug}/invitations/",
        {"email": "not-an-email", "role": "emperor"},
        format="json",
    )
    body = response.json()
    assert response.status_code == 400
    assert body["code"] == "invalid" and set(body["fields"]) == {"email", "role"}


def test_domain_errors_map_to_their_status_and_code(org, owner, client_for):
    members = client_for(owner).get(f"/api/v1/orgs/{org.slug}/members/").json()["results"]
    response = client_for(owner).delete(f"/api/v1/orgs/{org.slug}/members/{members[0]['id']}/")
    assert response.status_code == 409
    assert response.json()["code"] == "last_owner"


def test_key_with_scopes_wider_than_the_role_is_refused(org, member_factory, client_for):
    viewer = member_factory(org, "viewer")
    response = client_for(viewer).post(
        f"/api/v1/orgs/{org.slug}/api-keys/", {"name": "x", "scopes": ["jobs:write"]}, format="json"
    )
    assert response.status_code == 403
    assert response.json()["fields"]["scopes"]


def test_developers_see_only_their_own_keys(org, owner, member_factory, client_for):
    dev = member_factory(org, "developer")
    api_key_create(organization=org, name="owner's", scopes=["org:read"], actor=Actor(user=owner))
    mine, _ = api_key_create(
        organization=org, name="mine", scopes=["org:read"], actor=Actor(user=dev)
    )
    listed = client_for(dev).get(f"/api/v1/orgs/{org.slug}/api-keys/").json()["results"]
    assert [k["id"] for k in listed] == [mine.pk]
    assert len(client_for(owner).get(f"/api/v1/orgs/{org.slug}/api-keys/").json()["results"]) == 2


def test_lists_use_cursor_pagination(org, owner, client_for):
    AuditEventFactory.create_batch(5, organization=org)
    client = client_for(owner)
    first = client.get(f"/api/v1/orgs/{org.slug}/audit-events/?page_size=2").json()
    assert len(first["results"]) == 2 and first["next"]
    second = client.get(first["next"]).json()
    assert {e["id"] for e in first["results"]}.isdisjoint({e["id"] for e in second["results"]})


def test_audit_events_filter_by_action_actor_and_time(org, owner, client_for):
    old = timezone.now() - timedelta(days=3)
    AuditEventFactory(
        organization=org, action="member.remove", actor_label="a@x.test", created_at=old
    )
    AuditEventFactory(organization=org, action="api_key.create", actor_label="b@x.test")
    url = f"/api/v1/orgs/{org.slug}/audit-events/"
    client = client_for(owner)
    assert [e["action"] for e in client.get(url, {"action": "member."}).json()["results"]] == [
        "member.remove"
    ]
    assert [e["actor"] for e in client.get(url, {"actor": "b@"}).json()["results"]] == ["b@x.test"]
    since = (timezone.now() - timedelta(days=1)).isoformat()
    assert [e["action"] for e in client.get(url, {"since": since}).json()["results"]] == [
        "api_key.create"
    ]
    assert client.get(url, {"since": "yesterday"}).status_code == 400


def test_invitation_round_trip_through_the_api(
    org, owner, client_for, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        created = client_for(owner).post(
            f"/api/v1/orgs/{org.slug}/invitations/",
            {"email": "dev@example.test", "role": "developer"},
            format="json",
        )
    assert created.status_code == 201 and created.json()["status"] == "pending"
    token = invitation_token("dev@example.test")
    invitee = UserFactory(email="dev@example.test")
    accepted = client_for(invitee).post(
        "/api/v1/invitations/accept/", {"token": token}, format="json"
    )
    assert accepted.status_code == 201 and accepted.json()["role"] == "developer"
    assert client_for(invitee).get(f"/api/v1/orgs/{org.slug}/").status_code == 200


def test_keys_cannot_accept_invitations(org, owner, key_client_for):
    _inv, token = invite(
        organization=org, email="z@example.test", role="viewer", actor=Actor(user=owner)
    )
    response = key_client_for(owner, org).post(
        "/api/v1/invitations/accept/", {"token": token}, format="json"
    )
    assert response.status_code == 403


def test_api_changes_record_the_key_and_address_in_the_audit_log(org, owner, key_client_for):
    client = key_client_for(owner, org)
    client.patch(
        f"/api/v1/orgs/{org.slug}/", {"name": "Renamed"}, format="json", REMOTE_ADDR="192.0.2.7"
    )
    event = AuditEvent.objects.get(action="organization.update")
    assert event.actor_api_key is not None and event.actor_label.startswith("key fsk")
    assert event.ip == "192.0.2.7"


def test_creating_an_organization_by_session(user, client_for):
    response = client_for(user).post("/api/v1/orgs/", {"name": "New Co"}, format="json")
    assert response.status_code == 201 and response.json()["slug"] == "new-co"
    assert client_for(user).post("/api/v1/orgs/", {"name": ""}, format="json").status_code == 400


# Names end up in e-mail subjects, where a line break is a header injection (BadHeaderError).
CONTROL_NAMES = [
    "Acme\nBcc: everyone@victim.test",
    "Acme\r\nX-Priority: 1",
    "Tab\there",
    "Bell\x07",
    "Next\x85line",
    "Line\u2028separated",
]


@pytest.mark.parametrize("name", CONTROL_NAMES, ids=repr)
def test_organization_names_with_control_characters_are_refused(name, org, owner, client_for):
    creator, original = UserFactory(), org.name
    created = client_for(creator).post("/api/v1/orgs/", {"name": name}, format="json")
    assert created.status_code == 400, created.content
    assert created.json()["code"] == "invalid" and created.json()["fields"]["name"]
    assert not Membership.objects.filter(user=creator).exists()
    renamed = client_for(owner).patch(f"/api/v1/orgs/{org.slug}/", {"name": name}, format="json")
    assert renamed.status_code == 400, renamed.content
    assert renamed.json()["fields"]["name"]
    org.refresh_from_db()
    assert org.name == original
    assert not AuditEvent.objects.filter(action="organization.update").exists()


def test_organization_names_are_stored_without_surrounding_whitespace(user, client_for):
    created = client_for(user).post("/api/v1/orgs/", {"name": "  Padded Co\n"}, format="json")
    assert created.status_code == 201, created.content
    assert Organization.objects.get(slug=created.json()["slug"]).name == "Padded Co"


def test_schema_and_docs_are_served_without_a_cdn(client):
    schema = client.get("/api/v1/schema/")
    assert schema.status_code == 200 and b"/api/v1/orgs/{org_slug}/members/" in schema.content
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200
    assert (
        b"cdn" not in docs.content.lower() and b"/static/drf_spectacular_sidecar/" in docs.content
    )


def test_the_org_scoped_viewset_refuses_a_queryset_override_even_through_a_mixin():
    from tenants.api.base import OrganizationScopedViewSet

    class Sneaky:
        def get_queryset(self):
            return None

    with pytest.raises(TypeError, match="get_queryset"):
        type("Leaky", (Sneaky, OrganizationScopedViewSet), {})
