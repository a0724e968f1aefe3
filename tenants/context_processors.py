"""Navigation context: the user's organizations, the one being looked at, and its standing."""

from .selectors import organization_list_for_user
from .standing import organization_restriction


def organizations(request):
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    user_organizations = list(organization_list_for_user(user=user))
    current = getattr(request, "organization", None)
    # Only an organization's own pages (which set request.organization) pay for the standing.
    restriction = organization_restriction(current) if current is not None else None
    if current is None:
        slug = request.session.get("current_org")
        current = next((org for org in user_organizations if org.slug == slug), None)
    return {
        "user_organizations": user_organizations,
        "current_organization": current,
        "current_scopes": getattr(request, "organization_scopes", frozenset()),
        "organization_restriction": restriction,
    }
