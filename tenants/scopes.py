"""Roles and the scopes they grant: the one table every permission check reads."""

from django.db import models


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    DEVELOPER = "developer", "Developer"
    VIEWER = "viewer", "Viewer"
    BILLING = "billing", "Billing"


# Every scope the platform knows, with what it allows. A scope is handed on (by an invitation, a
# role change or a new API key) only by someone who holds it.
SCOPES: dict[str, str] = {
    "org:read": "See the organization",
    "org:admin": "Rename the organization and change its settings",
    "members:read": "See members and pending invitations",
    "members:admin": "Invite people, into roles whose scopes one holds, and revoke invitations",
    "members:owner": "Change members' roles and remove members, within the scopes one holds",
    "keys:write": "Create (signed in, never with a key) and revoke one's own API keys",
    "keys:admin": "See and revoke every API key of the organization",
    "audit:read": "Read the audit log",
    "jobs:read": "See jobs, their logs and metrics",
    "jobs:write": "Submit, cancel and retry jobs",
    "datasets:read": "See and download datasets",
    "datasets:write": "Upload and delete datasets",
    "models:read": "See and download models",
    "models:write": "Register and edit models",
    "models:promote": "Move model aliases such as production",
    "code:read": "See and download code packages and their manifests",
    "code:write": "Upload code packages (the code runs only in the sandbox, on jobs one submits)",
    "deployments:read": "See deployments, their replicas, timeline and live metrics",
    "deployments:write": "Create, change, route and delete deployments (replicas cost money)",
    "predict": "Call a deployment for predictions and send back their labels",
    "billing:read": "See usage, costs and invoices",
    "billing:admin": "Manage budgets and payment methods",
    "webhooks:read": "See webhook endpoints and their delivery log (payloads included)",
    "webhooks:admin": "Create, change, test and delete webhook endpoints and rotate their secrets",
}

_READ = {"org:read", "members:read", "keys:write"}
_BUILD = {
    "jobs:read",
    "jobs:write",
    "datasets:read",
    "datasets:write",
    "models:read",
    "models:write",
    "code:read",
    "code:write",
    "deployments:read",
    "deployments:write",
    "predict",
}

ROLE_SCOPES: dict[str, frozenset[str]] = {
    Role.OWNER: frozenset(SCOPES),
    Role.ADMIN: frozenset(SCOPES) - {"members:owner", "billing:admin"},
    Role.DEVELOPER: frozenset(_READ | _BUILD | {"models:promote"}),
    Role.VIEWER: frozenset(
        _READ | {"jobs:read", "datasets:read", "models:read", "code:read", "deployments:read"}
    ),
    Role.BILLING: frozenset(_READ | {"billing:read", "billing:admin"}),
}


def scopes_for_role(role: str) -> frozenset[str]:
    return ROLE_SCOPES.get(role, frozenset())


def roles_within(scopes: frozenset[str]) -> list[str]:
    """The roles someone holding `scopes` may hand on: those that carry nothing more."""
    return [role for role in Role.values if ROLE_SCOPES[role] <= scopes]
