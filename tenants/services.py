"""Writes for tenants: each owns its transaction and records its audit event inside it."""

from __future__ import annotations

import secrets
import smtplib
import string
import unicodedata
from collections.abc import Collection
from datetime import datetime, timedelta

from allauth.account.models import EmailAddress
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Model, Q
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from outbox.services import handler as outbox_handler
from outbox.services import message_enqueue

from .actors import Actor
from .errors import (
    ConflictError,
    DomainError,
    EmailUnverifiedError,
    InvitationInvalidError,
    LastOwnerError,
    PermissionDeniedError,
)
from .models import ApiKey, AuditEvent, Invitation, Membership, Organization, User
from .scopes import SCOPES, Role, scopes_for_role
from .selectors import actor_scopes, hash_secret, membership_get
from .signals import organization_created
from .standing import Effect, standing_check

_ALPHANUMERIC = string.ascii_letters + string.digits
API_KEY_PREFIX_LEN = 12
API_KEY_SECRET_LEN = 40


def _random_string(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def audit_record(
    *,
    organization: Organization,
    actor: Actor,
    action: str,
    target: Model | None = None,
    data: dict | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        organization=organization,
        actor_user=actor.user,
        actor_api_key=actor.api_key,
        actor_label=actor.label,
        action=action,
        target_type=target._meta.label_lower if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        target_label=str(target)[:255] if target is not None else "",
        ip=actor.ip,
        data=data or {},
    )


def _unique_slug(name: str) -> str:
    base = slugify(name)[:50] or "org"
    slug, n = base, 1
    while Organization.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{base}-{n}"
    return slug


# A name goes into e-mail subjects, where a line break is a header injection (Django refuses the
# mail with BadHeaderError), and onto pages: control characters, line and paragraph separators
# and lone surrogates (which PostgreSQL cannot store) have no place in it.
_NAME_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _organization_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise DomainError(
            "An organization needs a name.", fields={"name": ["This field is required."]}
        )
    if any(unicodedata.category(char) in _NAME_REFUSED_CATEGORIES for char in name):
        raise DomainError(
            "An organization name cannot hold control characters.",
            fields={"name": ["Remove the control characters (line breaks, tabs and the like)."]},
        )
    return name


@transaction.atomic
def organization_create(*, name: str, owner: User, actor: Actor) -> Organization:
    name = _organization_name(name)
    organization = Organization.objects.create(name=name, slug=_unique_slug(name))
    Membership.objects.create(organization=organization, user=owner, role=Role.OWNER)
    audit_record(
        organization=organization, actor=actor, action="organization.create", target=organization
    )
    organization_created.send(sender=Organization, organization=organization)
    return organization


@transaction.atomic
def organization_update(*, organization: Organization, name: str, actor: Actor) -> Organization:
    name = _organization_name(name)
    organization = Organization.objects.select_for_update().get(pk=organization.pk)
    old_name, organization.name = organization.name, name
    organization.save(update_fields=["name"])
    audit_record(
        organization=organization,
        actor=actor,
        action="organization.update",
        target=organization,
        data={"name": [old_name, name]},
    )
    return organization


@transaction.atomic
def organization_status_set(
    *,
    organization: Organization,
    status: str,
    actor: Actor,
    reason: str,
    only_from: Collection[str] | None = None,
) -> bool:
    """Move the organization to `status` (active, past due, suspended), audited with the reason;
    True if it moved. With `only_from`, it moves only from one of those statuses, decided under
    the row's lock (so billing's past due never replaces an operator's suspension).

    The caller's `organization` is updated too.
    """
    if status not in Organization.Status.values:
        raise DomainError(
            f"{status!r} is not an organization status.",
            fields={"status": [f"One of {', '.join(Organization.Status.values)}."]},
        )
    locked = Organization.objects.select_for_update().get(pk=organization.pk)
    organization.status = locked.status
    if locked.status == status or (only_from is not None and locked.status not in only_from):
        return False
    old_status, locked.status = locked.status, status
    locked.save(update_fields=["status"])
    organization.status = status
    audit_record(
        organization=locked,
        actor=actor,
        action="organization.status",
        target=locked,
        data={"status": [old_status, status], "reason": reason},
    )
    return True


def _lock_owners(organization: Organization) -> list[Membership]:
    # Locking every owner row serialises concurrent demotions, so two owners cannot demote each
    # other at once and leave nobody in charge.
    return list(
        Membership.objects.for_organization(organization)
        .select_for_update()
        .filter(role=Role.OWNER)
        .order_by("pk")
    )


def _require_holds_role(
    *, organization: Organization, actor: Actor, role: str, doing: str, field: str | None = None
) -> None:
    """A permission is handed on, or taken away, only by someone holding all of it.

    The actor must hold every scope of `role`; for the owner role that includes `members:owner`.
    """
    missing = sorted(scopes_for_role(role) - actor_scopes(organization=organization, actor=actor))
    if missing:
        detail = (
            f"You cannot {doing}: the {role} role carries scopes you do not hold "
            f"({', '.join(missing)})."
        )
        fields = {field: [f"Not yours to grant: {', '.join(missing)}."]} if field else None
        raise PermissionDeniedError(detail, fields=fields)


@transaction.atomic
def membership_change_role(*, membership: Membership, role: str, actor: Actor) -> Membership:
    if role not in Role.values:
        raise DomainError(
            f"Unknown role {role!r}.", fields={"role": [f"Choose one of {', '.join(Role.values)}."]}
        )
    organization = membership.organization
    owners = _lock_owners(organization)
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    _require_holds_role(
        organization=organization,
        actor=actor,
        role=membership.role,
        doing=f"change the role of a member who is {membership.role}",
    )
    _require_holds_role(
        organization=organization,
        actor=actor,
        role=role,
        doing=f"make someone {role}",
        field="role",
    )
    if membership.role == role:
        return membership
    if membership.role == Role.OWNER and len(owners) == 1:
        raise LastOwnerError("The last owner cannot be demoted; make someone else an owner first.")
    old_role, membership.role = membership.role, role
    membership.save(update_fields=["role"])
    audit_record(
        organization=membership.organization,
        actor=actor,
        action="member.role_change",
        target=membership,
        data={"email": membership.user.email, "role": [old_role, role]},
    )
    return membership


@transaction.atomic
def membership_remove(*, membership: Membership, actor: Actor) -> None:
    organization = membership.organization
    owners = _lock_owners(organization)
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    _require_holds_role(
        organization=organization,
        actor=actor,
        role=membership.role,
        doing=f"remove a member who is {membership.role}",
    )
    if membership.role == Role.OWNER and len(owners) == 1:
        raise LastOwnerError("The last owner cannot be removed; make someone else an owner first.")
    now = timezone.now()
    revoked = (
        ApiKey.objects.for_organization(organization)
        .filter(created_by=membership.user, revoked_at__isnull=True)
        .update(revoked_at=now)
    )
    audit_record(
        organization=organization,
        actor=actor,
        action="member.remove",
        target=membership,
        data={"email": membership.user.email, "role": membership.role, "keys_revoked": revoked},
    )
    membership.delete()


@outbox_handler(retry_on=(OSError, smtplib.SMTPException))
def invitation_mail_send(*, invitation_id: int) -> None:
    """Mail a pending invitation its link (an outbox handler: retried while the mail server is
    unreachable or refuses for now).

    The token is made here, at sending, and only its hash is kept, so it exists nowhere but in
    the e-mail; a repeated delivery mails a fresh link and the earlier one stops working.
    """
    with transaction.atomic():
        invitation = (
            Invitation.objects.select_for_update(of=("self",))
            .select_related("organization", "invited_by")
            .filter(pk=invitation_id)
            .first()
        )
        if invitation is None or invitation.status != Invitation.Status.PENDING:
            return
        token = secrets.token_urlsafe(32)
        invitation.token_hash = hash_secret(token)
        invitation.save(update_fields=["token_hash"])
    # The token rides in the fragment: browsers never send it, so it reaches no access log,
    # proxy or Referer header; the accept page posts it in the request body.
    url = f"{settings.SITE_URL.rstrip('/')}{reverse('tenants:invitation_accept')}#{token}"
    inviter = invitation.invited_by.email if invitation.invited_by else "A member"
    send_mail(
        subject=f"You are invited to {invitation.organization.name} on factory_saas",
        message=(
            f"{inviter} invited you to join {invitation.organization.name} "
            f"as {invitation.role}.\n\n"
            f"Accept within {settings.INVITATION_TTL_DAYS} days: {url}\n\n"
            f"Sign in as {invitation.email} to accept. New to factory_saas? Sign up with this "
            "address, confirm it from the e-mail we send you, then open this link again.\n"
        ),
        from_email=None,
        recipient_list=[invitation.email],
    )


@transaction.atomic
def invitation_create(
    *, organization: Organization, email: str, role: str, actor: Actor
) -> Invitation:
    """Invite an address. Its one-time token is stored only as a hash and travels only in the
    e-mail, so no response can hand it to whoever made the invitation."""
    email = email.strip().lower()
    if role not in Role.values:
        raise DomainError(
            f"Unknown role {role!r}.", fields={"role": [f"Choose one of {', '.join(Role.values)}."]}
        )
    _require_holds_role(
        organization=organization,
        actor=actor,
        role=role,
        doing=f"invite someone as {role}",
        field="role",
    )
    if Membership.objects.for_organization(organization).filter(user__email__iexact=email).exists():
        raise ConflictError(
            f"{email} is already a member.", fields={"email": ["Already a member."]}
        )
    now = timezone.now()
    # A new invitation to the same address replaces the open one (a resend).
    Invitation.objects.for_organization(organization).filter(
        email=email, accepted_at__isnull=True, revoked_at__isnull=True
    ).update(revoked_at=now)
    invitation = Invitation.objects.create(
        organization=organization,
        email=email,
        role=role,
        # Stands in until the e-mail is sent with the real token (invitation_mail_send).
        token_hash=hash_secret(secrets.token_urlsafe(32)),
        invited_by=actor.api_key.created_by if actor.api_key else actor.user,
        created_at=now,
        expires_at=now + timedelta(days=settings.INVITATION_TTL_DAYS),
    )
    audit_record(
        organization=organization,
        actor=actor,
        action="invitation.create",
        target=invitation,
        data={"email": email, "role": role},
    )
    message_enqueue(handler=invitation_mail_send, payload={"invitation_id": invitation.pk})
    return invitation


@transaction.atomic
def invitation_revoke(*, invitation: Invitation, actor: Actor) -> Invitation:
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
    if invitation.status != Invitation.Status.PENDING:
        raise ConflictError(f"This invitation is {invitation.status} and cannot be revoked.")
    invitation.revoked_at = timezone.now()
    invitation.save(update_fields=["revoked_at"])
    audit_record(
        organization=invitation.organization,
        actor=actor,
        action="invitation.revoke",
        target=invitation,
        data={"email": invitation.email},
    )
    return invitation


@transaction.atomic
def invitation_accept(*, token: str, user: User, actor: Actor) -> Membership:
    invitation = (
        Invitation.objects.select_for_update()
        .select_related("organization")
        .filter(token_hash=hash_secret(token))
        .first()
    )
    if invitation is None:
        raise InvitationInvalidError("This invitation link is not valid. Ask for a new one.")
    if invitation.status != Invitation.Status.PENDING:
        raise InvitationInvalidError(
            f"This invitation is {invitation.status}. Ask an admin of "
            f"{invitation.organization.name} for a new one."
        )
    # Only a confirmed address proves the mailbox: without this, anyone could sign up as the
    # invited address (where verification is optional) and accept with a token seen elsewhere.
    address = EmailAddress.objects.filter(user=user, email__iexact=invitation.email).first()
    if address is None and invitation.email.lower() != user.email.lower():
        raise InvitationInvalidError(
            f"This invitation was sent to {invitation.email}. "
            "Log in with that address to accept it."
        )
    if address is None or not address.verified:
        raise EmailUnverifiedError(
            f"Confirm {invitation.email} before accepting: open the link in the confirmation "
            "e-mail we sent to it, or send a new one from your account's e-mail page."
        )
    if membership_get(organization=invitation.organization, user=user) is not None:
        raise ConflictError(f"You are already a member of {invitation.organization.name}.")
    # Joining hands out access, which a suspended organization may not (403
    # organization_suspended); the invitation stays pending for when it is lifted.
    standing_check(organization=invitation.organization, effect=Effect.CHANGE)
    membership = Membership.objects.create(
        organization=invitation.organization, user=user, role=invitation.role
    )
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    audit_record(
        organization=invitation.organization,
        actor=actor,
        action="invitation.accept",
        target=membership,
        data={"email": user.email, "role": invitation.role},
    )
    return membership


@transaction.atomic
def api_key_create(
    *,
    organization: Organization,
    name: str,
    scopes: list[str],
    actor: Actor,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns it with the full token, which is shown once and never stored."""
    # A key that could mint keys could outlive its own revocation; only a person signed in
    # creates keys, so there is never a chain of keys to follow.
    if actor.api_key is not None:
        raise PermissionDeniedError(
            "API keys cannot create API keys; sign in to create one in the dashboard."
        )
    name = name.strip()
    if not name:
        raise DomainError("A key needs a name.", fields={"name": ["This field is required."]})
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise DomainError(
            f"Unknown scopes: {', '.join(unknown)}.",
            fields={"scopes": [f"Unknown: {', '.join(unknown)}."]},
        )
    if not scopes:
        raise DomainError(
            "A key needs at least one scope.", fields={"scopes": ["Choose at least one scope."]}
        )
    wider = sorted(set(scopes) - actor_scopes(organization=organization, actor=actor))
    if wider:
        raise PermissionDeniedError(
            f"A key cannot hold scopes you do not have: {', '.join(wider)}.",
            fields={"scopes": [f"Not yours to grant: {', '.join(wider)}."]},
        )
    if expires_at is not None and expires_at <= timezone.now():
        raise DomainError(
            "The expiry must be in the future.", fields={"expires_at": ["Must be in the future."]}
        )
    secret = _random_string(API_KEY_SECRET_LEN)
    for _ in range(5):
        prefix = "fsk" + _random_string(API_KEY_PREFIX_LEN - 3)
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.create(
                    organization=organization,
                    name=name,
                    prefix=prefix,
                    secret_hash=hash_secret(secret),
                    scopes=sorted(set(scopes)),
                    created_by=actor.user,
                    expires_at=expires_at,
                )
            break
        except IntegrityError:
            continue
    else:
        raise ConflictError("Could not allocate a unique key prefix; try again.")
    audit_record(
        organization=organization,
        actor=actor,
        action="api_key.create",
        target=api_key,
        data={
            "scopes": api_key.scopes,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return api_key, f"{prefix}_{secret}"


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey, actor: Actor) -> ApiKey:
    api_key = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        audit_record(
            organization=api_key.organization, actor=actor, action="api_key.revoke", target=api_key
        )
    return api_key


def api_key_mark_used(*, api_key: ApiKey) -> None:
    """Record use at most once per resolution window, with one conditional update."""
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.API_KEY_LAST_USED_RESOLUTION_S)
    if api_key.last_used_at and api_key.last_used_at > stale_before:
        return
    ApiKey.objects.filter(pk=api_key.pk).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale_before)
    ).update(last_used_at=now)
