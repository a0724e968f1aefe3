"""The app's URLs plus the baseline page of bench/pages.py: the organization shell.

The shell passes the same middleware, sign-in, membership and scope check as every
organization page and renders base.html (navigation, org switcher, budget banner) with no
content, so its time is what any dashboard page costs before its own queries.
"""

from django.urls import path
from django.views.generic import TemplateView

from factory_saas.urls import urlpatterns as app_urlpatterns
from tenants.views.base import OrganizationPageMixin


class OrgShellPage(OrganizationPageMixin, TemplateView):
    template_name = "base.html"
    required_scopes = {"get": "org:read"}


urlpatterns = [
    path("o/<slug:org_slug>/bench-shell/", OrgShellPage.as_view(), name="bench_org_shell"),
    *app_urlpatterns,
]
