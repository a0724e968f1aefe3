"""Dashboard pages for datasets, models, code packages, versions, aliases and lineage."""

import json
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect
from django.urls import reverse
from django.views import View
from django.views.generic import TemplateView

from tenants.errors import DomainError
from tenants.standing import Effect
from tenants.views.base import OrganizationPageMixin

from . import selectors, services
from .forms import AliasForm, CodePackageUploadForm, NamedForm
from .models import (
    CodePackage,
    CodePackageVersion,
    Dataset,
    DatasetVersion,
    ModelVersion,
    RegisteredModel,
)
from .storage import DOWNLOAD_URL_TTL_S, get_storage
from .uploads import refuse_oversized_body, uploaded_path


def lineage_with_links(organization, version) -> dict:
    """The lineage graph with a dashboard link on each version node."""
    graph = selectors.lineage(version=version)
    for node in graph["nodes"]:
        if node["type"] == "dataset_version":
            node["url"] = reverse(
                "registry:dataset_version",
                args=[organization.slug, node["dataset"], node["number"]],
            )
        elif node["type"] == "model_version":
            node["url"] = reverse(
                "registry:model_version", args=[organization.slug, node["model"], node["number"]]
            )
        elif node["type"] == "code_package_version":
            node["url"] = reverse(
                "registry:code_package_version",
                args=[organization.slug, node["package"], node["number"]],
            )
    by_id = {node["id"]: node for node in graph["nodes"]}
    graph["links"] = [(by_id[e["from"]], e["relation"], by_id[e["to"]]) for e in graph["edges"]]
    return graph


LIST_PAGE_SIZE = 50


class _CreateByName(OrganizationPageMixin, TemplateView):
    """A list page whose form creates a named thing (a dataset or a model)."""

    # An empty dataset or model costs nothing; its versions do.
    effects = {"post": Effect.CHANGE}
    create = None
    success_url_name = ""

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context.setdefault("form", NamedForm())
        return context

    def _listing(self, queryset) -> dict:
        """A page of `queryset` (50 a page), filtered by a part of the name (`?q=`)."""
        search = self.request.GET.get("q", "").strip()[:100]
        if search:
            queryset = queryset.filter(name__icontains=search)
        page = Paginator(queryset.order_by("name"), LIST_PAGE_SIZE).get_page(
            self.request.GET.get("page")
        )
        return {"page": page, "search": search, "query": urlencode({"q": search}) if search else ""}

    def post(self, request, org_slug):
        form = NamedForm(request.POST)
        if form.is_valid():
            try:
                created = type(self).create(
                    organization=self.organization, actor=self.actor, **form.cleaned_data
                )
            except DomainError as error:
                for field, errors in (error.fields or {None: [error.detail]}).items():
                    for message in errors:
                        form.add_error(field if field in form.fields else None, message)
            else:
                messages.success(request, f"{created.name} created.")
                return redirect(self.success_url_name, org_slug, created.name)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class DatasetsPage(_CreateByName):
    template_name = "registry/datasets.html"
    required_scopes = {"get": "datasets:read", "post": "datasets:write"}
    create = services.dataset_create
    success_url_name = "registry:dataset"

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context.update(self._listing(selectors.dataset_list(organization=self.organization)))
        context["storage"] = selectors.storage_usage(organization=self.organization)
        return context


class DatasetPage(OrganizationPageMixin, TemplateView):
    template_name = "registry/dataset.html"
    required_scopes = {"get": "datasets:read"}
    model = Dataset
    lookup_fields = {"name": "name"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        dataset = self.get_org_object()
        context["dataset"] = dataset
        context["versions"] = dataset.versions.select_related("created_by")[:200]
        context["upload_url"] = reverse(
            "dataset-version-list",
            kwargs={"org_slug": self.organization.slug, "dataset_name": dataset.name},
        )
        return context


class DatasetVersionPage(OrganizationPageMixin, TemplateView):
    template_name = "registry/dataset_version.html"
    required_scopes = {"get": "datasets:read"}
    model = DatasetVersion
    lookup_fields = {"dataset__name": "name", "number": "number"}

    def narrow_queryset(self, queryset):
        return queryset.select_related("dataset")

    def get_template_names(self):
        # The check's progress for its own refresh; a boosted navigation needs the whole page.
        htmx = self.request.htmx
        if htmx and not htmx.boosted:
            return ["registry/_dataset_version_state.html"]
        return [self.template_name]

    def render_to_response(self, context, **kwargs):
        response = super().render_to_response(context, **kwargs)
        htmx = self.request.htmx
        if htmx and not htmx.boosted and context["version"].state != DatasetVersion.State.CHECKING:
            # Checked: the schema, profile and preview appear, so the whole page is redrawn.
            response["HX-Refresh"] = "true"
        return response

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        version = self.get_org_object()
        context["version"] = version
        context["columns"] = [
            (column, version.profile.get(column["name"], {})) for column in version.schema
        ]
        context["preview_columns"] = list(version.preview[0]) if version.preview else []
        context["lineage"] = lineage_with_links(self.organization, version)
        return context


class DatasetVersionDownload(OrganizationPageMixin, View):
    required_scopes = {"get": "datasets:read"}
    model = DatasetVersion
    lookup_fields = {"dataset__name": "name", "number": "number"}

    def get(self, request, org_slug, name, number):
        version = self.get_org_object()
        if not version.is_ready:  # nothing to download yet, or ever: its page says why
            return redirect("registry:dataset_version", org_slug, name, number)
        filename = version.original_filename or f"{name}-v{number}.{version.format}"
        return redirect(
            get_storage().presigned_get_url(
                version.storage_key, filename=filename, expires_s=DOWNLOAD_URL_TTL_S
            )
        )


class ModelsPage(_CreateByName):
    template_name = "registry/models.html"
    required_scopes = {"get": "models:read", "post": "models:write"}
    create = services.registered_model_create
    success_url_name = "registry:model"

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context.update(
            self._listing(
                selectors.registered_model_list(organization=self.organization).prefetch_related(
                    "aliases__version"
                )
            )
        )
        return context


class ModelPage(OrganizationPageMixin, TemplateView):
    """Versions, aliases and promotion; `?compare=1,2` shows versions side by side."""

    template_name = "registry/model.html"
    required_scopes = {"get": "models:read", "post": "models:promote"}
    model = RegisteredModel
    lookup_fields = {"name": "name"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        registered_model = self.get_org_object()
        versions = list(registered_model.versions.prefetch_related("aliases")[:200])
        metric_names = sorted({k for v in versions for k in v.metrics})
        for version in versions:  # one cell per metric column, looked up once, not per cell
            version.metric_values = [version.metrics.get(name) for name in metric_names]
        context.update(
            registered_model=registered_model,
            versions=versions,
            aliases=registered_model.aliases.select_related("version", "updated_by"),
            metric_names=metric_names,
        )
        context.setdefault("form", AliasForm(versions=versions))
        compare = [int(n) for n in self.request.GET.getlist("compare") if n.isdigit()]
        if compare:
            context["comparison"] = selectors.model_versions_compare(
                registered_model=registered_model, numbers=compare
            )
        return context

    def post(self, request, org_slug, name):
        registered_model = self.get_org_object()
        versions = list(registered_model.versions.all()[:200])
        form = AliasForm(request.POST, versions=versions)
        if form.is_valid():
            version = next(v for v in versions if v.number == int(form.cleaned_data["version"]))
            try:
                services.model_alias_set(
                    registered_model=registered_model,
                    alias=form.cleaned_data["alias"],
                    version=version,
                    actor=self.actor,
                )
            except DomainError as error:
                form.add_error(None, error.detail)
            else:
                messages.success(
                    request, f"{form.cleaned_data['alias']} now points at v{version.number}."
                )
                return redirect("registry:model", org_slug, name)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class ModelVersionPage(OrganizationPageMixin, TemplateView):
    template_name = "registry/model_version.html"
    required_scopes = {"get": "models:read"}
    model = ModelVersion
    lookup_fields = {"registered_model__name": "name", "number": "number"}

    def narrow_queryset(self, queryset):
        return queryset.select_related("registered_model")

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        version = self.get_org_object()
        context["version"] = version
        context["artifacts"] = [
            (
                a,
                get_storage().presigned_get_url(
                    a.storage_key, filename=a.name, expires_s=DOWNLOAD_URL_TTL_S
                ),
            )
            for a in version.artifacts.all()
        ]
        bundle = selectors.edge_bundle_get(model_version=version)
        context["edge_bundle"] = bundle and (
            bundle,
            get_storage().presigned_get_url(
                bundle.storage_key,
                filename=f"{version.registered_model.name}-v{version.number}-edge.zip",
                expires_s=DOWNLOAD_URL_TTL_S,
            ),
        )
        context["lineage"] = lineage_with_links(self.organization, version)
        context["package"] = selectors.model_version_code_package(version)
        return context


class CodePackagesPage(OrganizationPageMixin, TemplateView):
    """Every code package with its latest version, and the form that uploads one."""

    template_name = "registry/code_packages.html"
    required_scopes = {"get": "code:read", "post": "code:write"}
    # Each upload is inspected in the request (up to the expansion budget): counted like an API
    # upload.
    throttle_scopes = {"post": "upload"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        packages = selectors.code_package_list(organization=self.organization).order_by("name")
        context["page"] = Paginator(packages, LIST_PAGE_SIZE).get_page(self.request.GET.get("page"))
        context.setdefault("form", CodePackageUploadForm())
        context["max_bytes"] = settings.CODE_PACKAGE_MAX_UPLOAD_BYTES
        return context

    def post(self, request, org_slug):
        try:
            # Before the body is read: an oversized one is refused unread.
            refuse_oversized_body(request, limit=settings.CODE_PACKAGE_MAX_UPLOAD_BYTES)
        except DomainError as error:
            form = CodePackageUploadForm()
            form.add_error(None, error.detail)
            return self.render_to_response(self.get_context_data(form=form), status=400)
        form = CodePackageUploadForm(request.POST, request.FILES)
        if form.is_valid():
            uploaded = form.cleaned_data["file"]
            try:
                with uploaded_path(uploaded) as path:
                    version = services.code_package_version_create(
                        organization=self.organization,
                        path=path,
                        filename=uploaded.name or "package",
                        actor=self.actor,
                    )
            except DomainError as error:
                form.add_error("file", error.detail)
            else:
                messages.success(request, f"{version} uploaded.")
                return redirect(
                    "registry:code_package_version", org_slug, version.package.name, version.number
                )
        return self.render_to_response(self.get_context_data(form=form), status=400)


class CodePackagePage(OrganizationPageMixin, TemplateView):
    template_name = "registry/code_package.html"
    required_scopes = {"get": "code:read"}
    model = CodePackage
    lookup_fields = {"name": "name"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        package = self.get_org_object()
        context["package"] = package
        context["versions"] = package.versions.select_related("created_by")[:200]
        return context


class CodePackageVersionPage(OrganizationPageMixin, TemplateView):
    """The manifest as stored, with the parameters a job will be asked for spelled out."""

    template_name = "registry/code_package_version.html"
    required_scopes = {"get": "code:read"}
    model = CodePackageVersion
    lookup_fields = {"package__name": "name", "number": "number"}

    def narrow_queryset(self, queryset):
        return queryset.select_related("package", "created_by")

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        version = self.get_org_object()
        schema = version.manifest.get("parameters", {})
        required = set(schema.get("required", []))
        context["version"] = version
        context["manifest"] = version.manifest
        context["parameters"] = [
            {
                "name": name,
                "type": spec.get("type", "") if isinstance(spec, dict) else "",
                "required": name in required,
                "default": json.dumps(spec["default"])
                if isinstance(spec, dict) and "default" in spec
                else "",
                "description": spec.get("description", "") if isinstance(spec, dict) else "",
            }
            for name, spec in schema.get("properties", {}).items()
        ]
        context["schema_json"] = json.dumps(schema, indent=2, sort_keys=True)
        context["download_url"] = get_storage().presigned_get_url(
            version.storage_key,
            filename=f"{version.package.name}-v{version.number}.{version.archive_format}",
            expires_s=DOWNLOAD_URL_TTL_S,
        )
        return context
