"""The dashboard shell: where a signed-in person lands."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect

from tenants.selectors import organization_list_for_user


@login_required
def home(request):
    organizations = organization_list_for_user(user=request.user)
    current = organizations.filter(slug=request.session.get("current_org")).first()
    current = current or organizations.first()
    if current is None:
        return redirect("tenants:organization_create")
    return redirect("tenants:overview", current.slug)
