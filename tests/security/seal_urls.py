"""Routes for tests/security/test_seal.py: org-scoped views written the ways that used to lose the
organization filter, mounted beside the project's own routes."""

from django.http import HttpResponse
from django.urls import path
from django.views import View
from rest_framework.response import Response

from factory_saas.urls import urlpatterns as project_urlpatterns
from jobs.api.views import JobViewSet
from jobs.models import Job
from registry.models import Dataset
from tenants.api.base import OrganizationScopedAPIView
from tenants.views.base import OrganizationPageMixin

# Narrowings a hurried author might write: each drops, widens or bypasses the organization filter.
NARROWINGS_WITHOUT_THE_FILTER = {
    "all": lambda view, queryset: Job.objects.all(),
    "other_model": lambda view, queryset: Dataset.objects.for_organization(view.organization),
    "or_everything": lambda view, queryset: queryset | Job.objects.all(),
    "union": lambda view, queryset: queryset.union(Job.objects.all()),
    "other_organizations": lambda view, queryset: Job.objects.exclude(
        organization=view.organization
    ),
    "filter_in_a_join": lambda view, queryset: Job.objects.filter(
        input_dataset_version__organization=view.organization
    ),
    "a_list": lambda view, queryset: list(Job.objects.all()),
}
# Narrowings that keep the filter: they must go on working.
SOUND_NARROWINGS = {
    "filter": lambda view, queryset: queryset.filter(recipe="tabular-classifier"),
    "exclude": lambda view, queryset: queryset.exclude(priority=99),
    "selector": lambda view, queryset: (
        Job.objects.for_organization(view.organization)
        .select_related("resource_class")
        .order_by("-pk")
    ),
    "none": lambda view, queryset: queryset.none(),
}


def _jobs_api(narrowing):
    class Narrowed(JobViewSet):
        def narrow_queryset(self, queryset):
            return narrowing(self, queryset)

    return Narrowed


class EverythingBackend:
    """A filter backend that answers with every tenant's jobs."""

    def filter_queryset(self, request, queryset, view):
        return Job.objects.all()


class EverythingFilteredJobs(JobViewSet):
    filter_backends = [EverythingBackend]


class JobRecipeView(OrganizationScopedAPIView):
    """A plain view about one job whose handler looks the job up by the raw URL id."""

    model = Job
    required_scopes = {"get": "jobs:read"}

    def get(self, request, org_slug, pk):
        return Response({"recipe": Job.objects.get(pk=pk).recipe})


class UnmodelledIdView(OrganizationScopedAPIView):
    """A plain view that takes an id from the URL but names no model to find it in."""

    required_scopes = {"get": "jobs:read"}

    def get(self, request, org_slug, pk):
        return Response({"recipe": Job.objects.get(pk=pk).recipe})


class JobRecipePage(OrganizationPageMixin, View):
    """A page about one job whose handler looks the job up by the raw URL id."""

    model = Job
    required_scopes = {"get": "jobs:read"}

    def get(self, request, org_slug, pk):
        return HttpResponse(Job.objects.get(pk=pk).recipe)


class UnmodelledIdPage(OrganizationPageMixin, View):
    required_scopes = {"get": "jobs:read"}

    def get(self, request, org_slug, pk):
        return HttpResponse(Job.objects.get(pk=pk).recipe)


def _job_page(narrowing):
    class Narrowed(OrganizationPageMixin, View):
        model = Job
        required_scopes = {"get": "jobs:read"}

        def narrow_queryset(self, queryset):
            return narrowing(self, queryset)

        def get(self, request, org_slug, pk):
            return HttpResponse(self.get_org_object().recipe)

    return Narrowed


API = "api/v1/orgs/<slug:org_slug>/seal/"
PAGE = "o/<slug:org_slug>/seal/"
urlpatterns = [
    *(
        route
        for name, narrowing in (NARROWINGS_WITHOUT_THE_FILTER | SOUND_NARROWINGS).items()
        for route in (
            path(
                f"{API}{name}/jobs/",
                _jobs_api(narrowing).as_view({"get": "list"}),
                name=f"seal-{name}-list",
            ),
            path(
                f"{API}{name}/jobs/<int:pk>/",
                _jobs_api(narrowing).as_view({"get": "retrieve"}),
                name=f"seal-{name}-detail",
            ),
            path(
                f"{PAGE}{name}/jobs/<int:pk>/",
                _job_page(narrowing).as_view(),
                name=f"seal-{name}-page",
            ),
        )
    ),
    path(
        f"{API}backend/jobs/",
        EverythingFilteredJobs.as_view({"get": "list"}),
        name="seal-backend-list",
    ),
    path(f"{API}jobs/<int:pk>/recipe/", JobRecipeView.as_view(), name="seal-api-raw-id"),
    path(f"{API}unmodelled/<int:pk>/", UnmodelledIdView.as_view(), name="seal-api-unmodelled"),
    path(f"{PAGE}jobs/<int:pk>/recipe/", JobRecipePage.as_view(), name="seal-page-raw-id"),
    path(f"{PAGE}unmodelled/<int:pk>/", UnmodelledIdPage.as_view(), name="seal-page-unmodelled"),
    *project_urlpatterns,
]
