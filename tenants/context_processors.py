"""Navigation context: the user's organizations and the one being looked at."""

from .selectors import organization_list_for_user


def organizations(request):
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    user_organizations = list(organization_list_for_user(user=user))
    current = getattr(request, "organization", None)
    if current is None:
        slug = request.session.get("current_org")
        current = next((org for org in user_organizations if org.slug == slug), None)
    return {
        "user_organizations": user_organizations,
        "current_organization": current,
        "current_scopes": getattr(request, "organization_scopes", frozenset()),
    }
