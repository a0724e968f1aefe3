"""Whether an organization may still spend: the one rule every action of an organization's API
and pages passes (HasOrganizationScope, OrganizationPageMixin), and accepting an invitation.

Each action has an effect (read, pay, reduce, change, spend); an organization's standing says which
effects it has lost. Suspension is decided here (an operator sets `Organization.status`); other
apps add standings of their own through providers they register at start-up (billing: payment past
due, budget reached), because tenants imports no other app.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from .errors import DomainError
from .models import Organization


class Effect(StrEnum):
    READ = "read"  # looks, never stopped
    PAY = (
        "pay"  # budgets, payment methods, invoices: never stopped, so a tenant can pay its way out
    )
    REDUCE = "reduce"  # cancel, delete, revoke: lowers spend or exposure, never stopped
    CHANGE = "change"  # other writes (settings, members, keys, aliases): stopped while suspended
    SPEND = "spend"  # costs money (jobs, retries, sweeps, uploads, versions, predictions)


# What a write needing each scope does when its view says nothing more precise. A scope missing
# here counts as spending, so a new write scope is held back until someone says otherwise.
SCOPE_EFFECTS: dict[str, Effect] = {
    "org:read": Effect.READ,
    "members:read": Effect.READ,
    "audit:read": Effect.READ,
    "jobs:read": Effect.READ,
    "datasets:read": Effect.READ,
    "models:read": Effect.READ,
    "code:read": Effect.READ,
    "billing:read": Effect.READ,
    "deployments:read": Effect.READ,
    "webhooks:read": Effect.READ,
    "billing:admin": Effect.PAY,
    "org:admin": Effect.CHANGE,
    "members:admin": Effect.CHANGE,
    "members:owner": Effect.CHANGE,
    "keys:write": Effect.CHANGE,
    "keys:admin": Effect.CHANGE,
    "webhooks:admin": Effect.CHANGE,
    "models:promote": Effect.CHANGE,
    "jobs:write": Effect.SPEND,
    "datasets:write": Effect.SPEND,
    "models:write": Effect.SPEND,
    "code:write": Effect.SPEND,
    "deployments:write": Effect.SPEND,
    "predict": Effect.SPEND,
}

_SAFE_METHODS = {"get", "head", "options"}


def action_effect(*, view, action: str, method: str, scope: str | None) -> Effect:
    """What an action does: the view's own word (`effects`, keyed like `required_scopes`), else
    reads for safe methods, reductions for DELETE, and otherwise what its scope allows."""
    declared = getattr(view, "effects", {}).get(action)
    if declared is not None:
        return declared
    method = method.lower()
    if method in _SAFE_METHODS:
        return Effect.READ
    if method == "delete":
        return Effect.REDUCE
    return SCOPE_EFFECTS.get(scope or "", Effect.SPEND)


@dataclass(frozen=True)
class Restriction:
    """Why an organization has lost some effects, said the same way by the API and the pages."""

    code: str
    status: int
    detail: str
    stops: frozenset[Effect]


class OrganizationRestricted(DomainError):
    def __init__(self, restriction: Restriction):
        super().__init__(restriction.detail)
        self.code = restriction.code
        self.status = restriction.status
        self.restriction = restriction


def suspended() -> Restriction:
    return Restriction(
        code="organization_suspended",
        status=403,
        detail=(
            "This organization is suspended: you can read, cancel, delete and pay, but not "
            "start new work or change access. Contact support."
        ),
        stops=frozenset({Effect.SPEND, Effect.CHANGE}),
    )


def payment_past_due(detail: str) -> Restriction:
    return Restriction(
        code="payment_past_due", status=402, detail=detail, stops=frozenset({Effect.SPEND})
    )


def budget_reached(detail: str) -> Restriction:
    return Restriction(
        code="budget_reached", status=402, detail=detail, stops=frozenset({Effect.SPEND})
    )


StandingProvider = Callable[[Organization], "Restriction | None"]
_providers: list[StandingProvider] = []


def standing_provider_register(provider: StandingProvider) -> None:
    """Called from an app's `AppConfig.ready`; registering twice (a reloaded app) is harmless."""
    if provider not in _providers:
        _providers.append(provider)


def organization_restriction(organization: Organization) -> Restriction | None:
    """The organization's first restriction, suspension first; None when in good standing.

    `Organization.status` past_due is only a label (billing sets it at the first failed payment);
    billing's provider decides, after the grace period, whether it stops spending.
    """
    if organization.status == Organization.Status.SUSPENDED:
        return suspended()
    for provider in _providers:
        restriction = provider(organization)
        if restriction is not None:
            return restriction
    return None


def standing_check(*, organization: Organization, effect: Effect) -> None:
    """Raise OrganizationRestricted when the organization has lost `effect`; reads, payments and
    reductions are never stopped, and never cost a query."""
    if effect in (Effect.READ, Effect.PAY, Effect.REDUCE):
        return
    restriction = organization_restriction(organization)
    if restriction is not None and effect in restriction.stops:
        raise OrganizationRestricted(restriction)
