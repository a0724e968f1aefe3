"""Reads of tenant data; each takes the organization explicitly and never writes."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime

from django.db.models import OuterRef, QuerySet, Subquery
from django.http import Http404

from .actors import Actor
from .compiled import CompiledRows, row_fields, row_instance
from .models import ApiKey, AuditEvent, Invitation, Membership, Organization, User
from .scopes import scopes_for_role


def hash_secret(secret: str) -> str:
    # Secrets are long random strings, so a fast hash is enough; a slow KDF buys nothing here.
    return hashlib.sha256(secret.encode()).hexdigest()


def organization_list_for_user(*, user: User) -> QuerySet[Organization]:
    return Organization.objects.filter(tenants_membership_set__user=user).order_by("name")


def membership_get(*, organization: Organization, user: User) -> Membership | None:
    return Membership.objects.for_organization(organization).filter(user=user).first()


def _scopes_held(*, role: str | None, api_key: ApiKey | None) -> frozenset[str]:
    # The one rule for what a request holds: a session its role's scopes; a key its own scopes
    # narrowed by its creator's current role (`role` is then the creator's; None: not a member).
    held = scopes_for_role(role) if role is not None else frozenset()
    if api_key is not None:
        held &= frozenset(api_key.scopes)
    return held


def api_key_scopes(*, api_key: ApiKey) -> frozenset[str]:
    """A key never holds more than its creator's current role allows. A key read by
    `api_key_get_by_token` brought that role with it, read in the same query."""
    if hasattr(api_key, "creator_role"):
        return _scopes_held(role=api_key.creator_role, api_key=api_key)
    membership = membership_get(organization=api_key.organization, user=api_key.created_by)
    return _scopes_held(role=membership.role if membership else None, api_key=api_key)


def actor_scopes(*, organization: Organization, actor: Actor) -> frozenset[str]:
    """The scopes an actor holds in an organization: what it may do, and the most it may hand on
    (in an invitation, a role change or a new key)."""
    if actor.api_key is not None:
        if actor.api_key.organization_id != organization.pk or not actor.api_key.is_active:
            return frozenset()
        return api_key_scopes(api_key=actor.api_key)
    if actor.user is None:
        return frozenset()
    membership = membership_get(organization=organization, user=actor.user)
    return _scopes_held(role=membership.role if membership else None, api_key=None)


def organization_access(
    *, slug: str, user: User, api_key: ApiKey | None = None
) -> tuple[Organization, Membership | None, frozenset[str]]:
    """The organization a request may reach and the scopes it holds there.

    Anything the caller may not see raises Http404, exactly like a missing organization.
    """
    if api_key is not None:
        if api_key.organization.slug != slug:
            raise Http404
        return api_key.organization, None, api_key_scopes(api_key=api_key)
    membership = (
        Membership.objects.select_related("organization")
        .filter(organization__slug=slug, user=user)
        .first()
    )
    if membership is None:
        raise Http404
    return membership.organization, membership, _scopes_held(role=membership.role, api_key=None)


def _api_key_by_prefix(*, prefix: str) -> QuerySet:
    # The creator's current role in the key's organization too (None when no longer a
    # member): every request a key makes needs it (api_key_scopes), so it rides on this query.
    creator_role = Membership.objects.filter(
        organization=OuterRef("organization"), user=OuterRef("created_by")
    ).values("role")[:1]
    return (
        ApiKey.objects.filter(prefix=prefix)
        .order_by()
        .annotate(creator_role=Subquery(creator_role))
        .values(
            *row_fields(ApiKey),
            *row_fields(Organization, prefix="organization__"),
            *row_fields(User, prefix="created_by__"),
            "creator_role",
        )
    )


# Every request a key makes reads it: building and compiling this query cost 3 of its 4 ms.
_API_KEY_BY_PREFIX = CompiledRows(_api_key_by_prefix, prepared=True, prefix=str)


def api_key_get_by_token(*, token: str) -> ApiKey | None:
    prefix, sep, secret = token.partition("_")
    if not sep or not secret or "\x00" in prefix:  # PostgreSQL text cannot hold NUL
        return None
    rows = _API_KEY_BY_PREFIX.rows(prefix=prefix)
    if not rows or not hmac.compare_digest(rows[0]["secret_hash"], hash_secret(secret)):
        return None
    api_key = row_instance(ApiKey, rows[0])
    api_key.organization = row_instance(Organization, rows[0], prefix="organization__")
    api_key.created_by = row_instance(User, rows[0], prefix="created_by__")
    api_key.creator_role = rows[0]["creator_role"]
    return api_key


def member_list(*, organization: Organization) -> QuerySet[Membership]:
    return Membership.objects.for_organization(organization).select_related("user")


def owner_count(*, organization: Organization) -> int:
    return Membership.objects.for_organization(organization).filter(role="owner").count()


def invitation_list(*, organization: Organization) -> QuerySet[Invitation]:
    return Invitation.objects.for_organization(organization).select_related("invited_by")


def api_key_list(*, organization: Organization, created_by: User | None = None) -> QuerySet[ApiKey]:
    keys = ApiKey.objects.for_organization(organization).select_related("created_by")
    if created_by is not None:
        keys = keys.filter(created_by=created_by)
    return keys


def audit_event_list(
    *,
    organization: Organization,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[AuditEvent]:
    events = AuditEvent.objects.for_organization(organization)
    if action:
        events = events.filter(action__startswith=action)
    if actor:
        events = events.filter(actor_label__icontains=actor)
    if since:
        events = events.filter(created_at__gte=since)
    if until:
        events = events.filter(created_at__lt=until)
    return events
