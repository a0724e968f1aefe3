"""Scope checks: each view declares the scope every action needs; anything undeclared is denied."""

from rest_framework import exceptions, permissions

from tenants.standing import Effect, action_effect, standing_check


class DenyAll(permissions.BasePermission):
    """The default: a view that declares nothing allows nothing."""

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated):
            raise exceptions.NotAuthenticated
        return False


def view_action(view, request) -> str:
    """What a view keys `required_scopes`, `effects` and `throttle_scopes` by: a viewset's
    action, else the HTTP method."""
    return getattr(view, "action", None) or request.method.lower()


def required_scope(view, request) -> str | None:
    return getattr(view, "required_scopes", {}).get(view_action(view, request))


def request_effect(view, request) -> Effect:
    """What the request would do to spend (tenants.standing)."""
    return action_effect(
        view=view,
        action=view_action(view, request),
        method=request.method,
        scope=required_scope(view, request),
    )


class HasOrganizationScope(permissions.BasePermission):
    """Authenticated, then a member of the organization (else 404), then the declared scope, then
    a session where the view allows the action to people only, then the organization's standing
    (a suspended or unpaid organization may not spend)."""

    message = "Your role in this organization does not allow this."

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated):
            raise exceptions.NotAuthenticated
        view.resolve_organization()
        scope = required_scope(view, request)
        if scope is None:
            return False
        if scope not in view.granted_scopes:
            self.message = f"This needs the `{scope}` scope, which your role or key does not grant."
            return False
        if request.auth is not None and view_action(view, request) in view.session_only_actions:
            self.message = IsUserSession.message
            return False
        standing_check(organization=view.organization, effect=request_effect(view, request))
        return True


class IsUserSession(permissions.BasePermission):
    """Actions only a person may take in their own name, never an API key."""

    message = "API keys cannot do this; sign in as a user."

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated):
            raise exceptions.NotAuthenticated
        return request.auth is None
