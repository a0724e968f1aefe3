"""The REST API router: /api/v1/, its OpenAPI schema and its docs (served without a CDN)."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from billing.api import urls as billing_urls
from jobs.api import urls as jobs_urls
from registry.api import urls as registry_urls
from tenants.api import urls as tenants_urls

org_urlpatterns = [
    *tenants_urls.org_urlpatterns,
    *registry_urls.org_urlpatterns,
    *jobs_urls.org_urlpatterns,
    *billing_urls.org_urlpatterns,
]

urlpatterns = [
    *tenants_urls.urlpatterns,
    *jobs_urls.urlpatterns,
    path("orgs/<slug:org_slug>/", include(org_urlpatterns)),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="swagger-ui"),
]
