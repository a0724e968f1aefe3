"""Tenant services against the real database: roles, owners, invitations, keys, audit."""

import hashlib
import re
from datetime import timedelta

import pytest
from allauth.account.models import EmailAddress
from django.core import mail
from django.utils import timezone

from outbox.models import Message
from outbox.services import outbox_drain
from tenants import services
from tenants.actors import Actor
from tenants.errors import (
    ConflictError,
    DomainError,
    EmailUnverifiedError,
    InvitationInvalidError,
    LastOwnerError,
    PermissionDeniedError,
)
from tenants.models import ApiKey, AuditEvent, Invitation, Membership
from tenants.scopes import ROLE_SCOPES
from tenants.selectors import api_key_get_by_token, api_key_scopes, hash_secret, membership_get
from tests.factories import UserFactory
from tests.tenants.invitations import invite

pytestmark = pytest.mark.django_db


def test_creating_an_organization_makes_the_creator_its_owner_and_audits_it(user):
    org = services.organization_create(
        name="Acme ML", owner=user, actor=Actor(user=user, ip="10.0.0.1")
    )
    assert org.slug == "acme-ml"
    assert membership_get(organization=org, user=user).role == "owner"
    event = AuditEvent.objects.get(organization=org, action="organization.create")
    assert (event.action, event.actor_label, event.ip) == (
        "organization.create",
        user.email,
        "10.0.0.1",
    )


def test_organization_slugs_stay_unique(user):
    first = services.organization_create(name="Acme", owner=user, actor=Actor(user=user))
    second = services.organization_create(name="Acme", owner=user, actor=Actor(user=user))
    assert (first.slug, second.slug) == ("acme", "acme-2")


def test_last_owner_can_be_neither_demoted_nor_removed(org, owner):
    membership = membership_get(organization=org, user=owner)
    with pytest.raises(LastOwnerError):
        services.membership_change_role(
            membership=membership, role="admin", actor=Actor(user=owner)
        )
    with pytest.raises(LastOwnerError):
        services.membership_remove(membership=membership, actor=Actor(user=owner))
    assert Membership.objects.get(pk=membership.pk).role == "owner"


def test_an_owner_can_step_down_once_another_owner_exists(org, owner, member_factory):
    member_factory(org, "owner")
    membership = membership_get(organization=org, user=owner)
    services.membership_change_role(
        membership=membership, role="developer", actor=Actor(user=owner)
    )
    assert Membership.objects.get(pk=membership.pk).role == "developer"
    assert AuditEvent.objects.filter(
        action="member.role_change", data__role=["owner", "developer"]
    ).exists()


def test_removing_a_member_revokes_their_keys(org, owner, member_factory):
    dev = member_factory(org, "developer")
    key, _token = services.api_key_create(
        organization=org, name="ci", scopes=["jobs:read"], actor=Actor(user=dev)
    )
    services.membership_remove(
        membership=membership_get(organization=org, user=dev), actor=Actor(user=owner)
    )
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    assert not Membership.objects.filter(organization=org, user=dev).exists()


def test_invitation_is_emailed_and_single_use(org, owner):
    invitation, token = invite(
        organization=org, email="New@Example.test", role="viewer", actor=Actor(user=owner)
    )
    assert invitation.email == "new@example.test"
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["new@example.test"]
    invitee = UserFactory(email="new@example.test")
    membership = services.invitation_accept(token=token, user=invitee, actor=Actor(user=invitee))
    assert membership.role == "viewer"
    with pytest.raises(InvitationInvalidError, match="accepted"):
        services.invitation_accept(token=token, user=invitee, actor=Actor(user=invitee))


def test_an_invitation_made_while_the_mail_server_is_down_is_mailed_once_it_listens(
    org, owner, smtp_down
):
    invitation = services.invitation_create(
        organization=org, email="pat@example.test", role="viewer", actor=Actor(user=owner)
    )
    assert outbox_drain() == 0  # SMTP down: the e-mail stays owed, the invitation stands
    owed = Message.objects.get(handler="tenants.services.invitation_mail_send")
    assert owed.state == Message.State.PENDING and "Connection refused" in owed.last_error

    with smtp_down.listen():
        assert outbox_drain(now=owed.next_attempt_at) == 1
    [envelope] = smtp_down.envelopes
    assert envelope.rcpt_tos == ["pat@example.test"]
    token = re.search(r"/invitations/accept/#(\S+)", envelope.content.decode()).group(1)
    invitee = UserFactory(email="pat@example.test")
    membership = services.invitation_accept(token=token, user=invitee, actor=Actor(user=invitee))
    assert membership.organization == invitation.organization
    assert outbox_drain(now=timezone.now() + timedelta(days=1)) == 0  # mailed once


def test_the_invitation_row_and_its_audit_hold_only_the_hash_of_the_mailed_token(org, owner):
    invitation, token = invite(
        organization=org, email="new@example.test", role="viewer", actor=Actor(user=owner)
    )
    row = Invitation.objects.filter(pk=invitation.pk).values().get()
    # SHA-256 of exactly the token the e-mail carried: a different or truncated token fails here.
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert len(token) >= 40
    assert [column for column, value in row.items() if token in str(value)] == []
    audit = list(AuditEvent.objects.filter(organization=org).values())
    assert [event["action"] for event in audit] == ["invitation.create"]
    assert [event for event in audit if token in str(event)] == []
    invitee = UserFactory(email="new@example.test")
    services.invitation_accept(token=token, user=invitee, actor=Actor(user=invitee))
    for model in (Invitation, AuditEvent):
        assert not [r for r in model.objects.filter(organization=org).values() if token in str(r)]


def test_accepting_needs_the_invited_address_confirmed_on_the_account(org, owner):
    _invitation, token = invite(
        organization=org, email="second@example.test", role="viewer", actor=Actor(user=owner)
    )
    invitee = UserFactory(email="first@example.test")
    # The invited address added to the account but not yet confirmed.
    address = EmailAddress.objects.create(user=invitee, email="second@example.test")
    with pytest.raises(EmailUnverifiedError, match=r"Confirm second@example\.test"):
        services.invitation_accept(token=token, user=invitee, actor=Actor(user=invitee))
    assert membership_get(organization=org, user=invitee) is None
    address.verified = True
    address.save()
    membership = services.invitation_accept(token=token, user=invitee, actor=Actor(user=invitee))
    assert membership.role == "viewer"


def test_invitation_expires_after_seven_days(org, owner):
    invitation, token = invite(
        organization=org, email="late@example.test", role="viewer", actor=Actor(user=owner)
    )
    assert invitation.expires_at - invitation.created_at == timedelta(days=7)
    Invitation.objects.filter(pk=invitation.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    invitee = UserFactory(email="late@example.test")
    with pytest.raises(InvitationInvalidError, match="expired"):
        services.invitation_accept(token=token, user=invitee, actor=Actor(user=invitee))


def test_invitation_only_works_for_the_invited_address(org, owner):
    _invitation, token = invite(
        organization=org, email="right@example.test", role="viewer", actor=Actor(user=owner)
    )
    wrong = UserFactory(email="wrong@example.test")
    with pytest.raises(InvitationInvalidError, match=r"right@example\.test"):
        services.invitation_accept(token=token, user=wrong, actor=Actor(user=wrong))


def test_resending_an_invitation_revokes_the_previous_link(org, owner):
    _first, first_token = invite(
        organization=org, email="x@example.test", role="viewer", actor=Actor(user=owner)
    )
    services.invitation_create(
        organization=org, email="x@example.test", role="admin", actor=Actor(user=owner)
    )
    invitee = UserFactory(email="x@example.test")
    with pytest.raises(InvitationInvalidError, match="revoked"):
        services.invitation_accept(token=first_token, user=invitee, actor=Actor(user=invitee))


def test_only_owners_invite_owners_and_members_are_not_reinvited(org, owner, member_factory):
    admin = member_factory(org, "admin")
    with pytest.raises(PermissionDeniedError):
        services.invitation_create(
            organization=org, email="o@example.test", role="owner", actor=Actor(user=admin)
        )
    with pytest.raises(ConflictError):
        services.invitation_create(
            organization=org, email=admin.email, role="viewer", actor=Actor(user=owner)
        )


def test_an_owners_full_key_may_hand_on_any_role(org, owner, member_factory):
    key, _token = services.api_key_create(
        organization=org, name="all", scopes=sorted(ROLE_SCOPES["owner"]), actor=Actor(user=owner)
    )
    keyed = Actor(user=owner, api_key=key)
    invitation = services.invitation_create(
        organization=org, email="o@example.test", role="owner", actor=keyed
    )
    assert invitation.role == "owner"
    dev = member_factory(org, "developer")
    membership = membership_get(organization=org, user=dev)
    services.membership_change_role(membership=membership, role="billing", actor=keyed)
    assert Membership.objects.get(pk=membership.pk).role == "billing"


def test_a_key_hands_on_only_what_its_creators_current_role_still_holds(org, owner, member_factory):
    creator = member_factory(org, "owner")
    key, _token = services.api_key_create(
        organization=org, name="all", scopes=sorted(ROLE_SCOPES["owner"]), actor=Actor(user=creator)
    )
    services.membership_change_role(
        membership=membership_get(organization=org, user=creator),
        role="admin",
        actor=Actor(user=owner),
    )
    with pytest.raises(PermissionDeniedError, match="billing:admin"):
        services.invitation_create(
            organization=org,
            email="b@example.test",
            role="billing",
            actor=Actor(user=creator, api_key=key),
        )
    assert not Invitation.objects.filter(email="b@example.test").exists()


def test_a_key_cannot_create_a_key_even_when_called_as_a_service(org, owner):
    key, _token = services.api_key_create(
        organization=org, name="all", scopes=sorted(ROLE_SCOPES["owner"]), actor=Actor(user=owner)
    )
    with pytest.raises(PermissionDeniedError, match="cannot create API keys"):
        services.api_key_create(
            organization=org,
            name="child",
            scopes=["org:read"],
            actor=Actor(user=owner, api_key=key),
        )
    assert list(ApiKey.objects.values_list("name", flat=True)) == ["all"]


def test_api_key_scopes_are_no_wider_than_the_creators_role(org, member_factory):
    viewer = member_factory(org, "viewer")
    with pytest.raises(PermissionDeniedError, match="jobs:write"):
        services.api_key_create(
            organization=org, name="k", scopes=["jobs:write"], actor=Actor(user=viewer)
        )
    with pytest.raises(DomainError, match="Unknown scopes"):
        services.api_key_create(
            organization=org, name="k", scopes=["root"], actor=Actor(user=viewer)
        )
    assert not ApiKey.objects.exists()


def test_api_key_is_stored_only_as_a_hash_and_found_by_its_token(org, owner):
    key, token = services.api_key_create(
        organization=org, name="ci", scopes=["org:read"], actor=Actor(user=owner)
    )
    prefix, secret = token.split("_")
    assert prefix == key.prefix
    assert key.secret_hash == hash_secret(secret)
    key.refresh_from_db()
    for field in ApiKey._meta.concrete_fields:
        assert secret not in str(field.value_from_object(key)), field.name
    for event in AuditEvent.objects.filter(organization=org):
        for field in AuditEvent._meta.concrete_fields:
            assert secret not in str(field.value_from_object(event)), field.name
    assert api_key_get_by_token(token=token) == key
    assert api_key_get_by_token(token=f"{prefix}_{'x' * len(secret)}") is None


def test_a_demoted_creator_narrows_their_keys(org, owner, member_factory):
    member_factory(org, "owner")
    key, _ = services.api_key_create(
        organization=org, name="ci", scopes=["jobs:write", "org:read"], actor=Actor(user=owner)
    )
    services.membership_change_role(
        membership=membership_get(organization=org, user=owner),
        role="viewer",
        actor=Actor(user=owner),
    )
    assert api_key_scopes(api_key=key) == {"org:read"}


def test_last_used_is_written_at_most_once_a_minute(org, owner):
    key, _ = services.api_key_create(
        organization=org, name="ci", scopes=["org:read"], actor=Actor(user=owner)
    )
    services.api_key_mark_used(api_key=key)
    key.refresh_from_db()
    first = key.last_used_at
    services.api_key_mark_used(api_key=key)
    key.refresh_from_db()
    assert key.last_used_at == first
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=first - timedelta(minutes=2))
    key.refresh_from_db()
    services.api_key_mark_used(api_key=key)
    key.refresh_from_db()
    assert key.last_used_at > first - timedelta(minutes=2)


def test_every_change_writes_its_audit_event_in_the_same_transaction(org, owner):
    """A change that fails leaves neither the change nor an audit row behind."""
    before = AuditEvent.objects.count()
    with pytest.raises(DomainError):
        services.organization_update(organization=org, name="  ", actor=Actor(user=owner))
    assert AuditEvent.objects.count() == before
    services.organization_update(organization=org, name="Renamed", actor=Actor(user=owner))
    assert AuditEvent.objects.filter(
        action="organization.update", data__name=[org.name, "Renamed"]
    ).exists()


def test_an_organization_status_change_is_audited_with_its_reason(org, owner):
    actor = Actor(user=owner)
    assert services.organization_status_set(
        organization=org, status="suspended", actor=actor, reason="abuse report 42"
    )
    assert org.status == "suspended"
    org.refresh_from_db()
    assert org.status == "suspended"
    event = AuditEvent.objects.get(organization=org, action="organization.status")
    assert event.data == {"status": ["active", "suspended"], "reason": "abuse report 42"}
    assert event.actor_user == owner

    # No change, no event; a change allowed only from other statuses leaves this one alone.
    assert not services.organization_status_set(
        organization=org, status="suspended", actor=actor, reason=""
    )
    assert not services.organization_status_set(
        organization=org, status="past_due", actor=actor, reason="payment", only_from=["active"]
    )
    org.refresh_from_db()
    assert org.status == "suspended"
    assert AuditEvent.objects.filter(organization=org, action="organization.status").count() == 1


def test_an_unknown_organization_status_is_refused_and_nothing_written(org, owner):
    with pytest.raises(DomainError) as refused:
        services.organization_status_set(
            organization=org, status="deleted", actor=Actor(user=owner), reason=""
        )
    assert "status" in refused.value.fields
    org.refresh_from_db()
    assert org.status == "active"
    assert not AuditEvent.objects.filter(organization=org, action="organization.status").exists()
