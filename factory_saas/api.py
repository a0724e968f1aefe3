"""The REST API router: /api/v1/, its OpenAPI schema and its docs (served without a CDN)."""

from django.http import JsonResponse
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from billing.api import urls as billing_urls
from jobs.api import urls as jobs_urls
from registry.api import urls as registry_urls
from serving.api import urls as serving_urls
from tenants.api import urls as tenants_urls
from webhooks.api import urls as webhooks_urls

org_urlpatterns = [
    *tenants_urls.org_urlpatterns,
    *registry_urls.org_urlpatterns,
    *jobs_urls.org_urlpatterns,
    *billing_urls.org_urlpatterns,
    *serving_urls.org_urlpatterns,
    *webhooks_urls.org_urlpatterns,
]


# Exempt like every API view, so a POST to a wrong path is a 404, not a CSRF failure page.
@csrf_exempt
def not_found(request, *args, **kwargs):
    """A path under /api/v1/ that no route matches (e.g. a malformed slug) is a JSON 404 too."""
    return JsonResponse({"code": "not_found", "detail": "Not found."}, status=404)


urlpatterns = [
    *tenants_urls.urlpatterns,
    *jobs_urls.urlpatterns,
    path("orgs/<slug:org_slug>/", include(org_urlpatterns)),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="swagger-ui"),
    re_path(r"", not_found),
]
