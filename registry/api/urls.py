"""Registry routes, mounted under /api/v1/orgs/<org_slug>/."""

from django.urls import path

from . import views


def _route(route: str, viewset, actions: dict[str, str], name: str, **initkwargs):
    return path(route, viewset.as_view(actions, **initkwargs), name=name)


org_urlpatterns = [
    _route("datasets/", views.DatasetViewSet, {"get": "list", "post": "create"}, "dataset-list"),
    _route(
        "datasets/<str:name>/",
        views.DatasetViewSet,
        {"get": "retrieve", "patch": "partial_update", "delete": "destroy"},
        "dataset-detail",
    ),
    _route(
        "datasets/<str:dataset_name>/versions/",
        views.DatasetVersionViewSet,
        {"get": "list", "post": "create"},
        "dataset-version-list",
    ),
    _route(
        "datasets/<str:dataset_name>/versions/<int:number>/",
        views.DatasetVersionViewSet,
        {"get": "retrieve"},
        "dataset-version-detail",
    ),
    _route(
        "datasets/<str:dataset_name>/versions/<int:number>/download/",
        views.DatasetVersionViewSet,
        {"get": "download"},
        "dataset-version-download",
    ),
    _route(
        "datasets/<str:dataset_name>/versions/<int:number>/lineage/",
        views.DatasetVersionViewSet,
        {"get": "lineage"},
        "dataset-version-lineage",
    ),
    _route(
        "datasets/<str:dataset_name>/uploads/",
        views.PendingUploadViewSet,
        {"post": "create"},
        "dataset-upload-list",
    ),
    _route(
        "datasets/<str:dataset_name>/uploads/<int:pk>/",
        views.PendingUploadViewSet,
        {"delete": "destroy"},
        "dataset-upload-detail",
    ),
    _route(
        "datasets/<str:dataset_name>/uploads/<int:pk>/parts/",
        views.PendingUploadViewSet,
        {"get": "parts", "post": "part_urls"},
        "dataset-upload-parts",
    ),
    _route(
        "datasets/<str:dataset_name>/uploads/<int:pk>/finalize/",
        views.PendingUploadViewSet,
        {"post": "finalize"},
        "dataset-upload-finalize",
    ),
    _route(
        "code-packages/",
        views.CodePackageViewSet,
        {"get": "list", "post": "create"},
        "code-package-list",
    ),
    _route(
        "code-packages/<str:name>/",
        views.CodePackageViewSet,
        {"get": "retrieve"},
        "code-package-detail",
    ),
    _route(
        "code-packages/<str:package_name>/versions/",
        views.CodePackageVersionViewSet,
        {"get": "list"},
        "code-package-version-list",
    ),
    _route(
        "code-packages/<str:package_name>/versions/<int:number>/",
        views.CodePackageVersionViewSet,
        {"get": "retrieve"},
        "code-package-version-detail",
    ),
    _route(
        "code-packages/<str:package_name>/versions/<int:number>/download/",
        views.CodePackageVersionViewSet,
        {"get": "download"},
        "code-package-version-download",
    ),
    _route(
        "models/", views.RegisteredModelViewSet, {"get": "list", "post": "create"}, "model-list"
    ),
    _route(
        "models/<str:name>/",
        views.RegisteredModelViewSet,
        {"get": "retrieve", "patch": "partial_update"},
        "model-detail",
    ),
    _route(
        "models/<str:name>/compare/",
        views.RegisteredModelViewSet,
        {"get": "compare"},
        "model-compare",
    ),
    _route(
        "models/<str:model_name>/versions/",
        views.ModelVersionViewSet,
        {"get": "list", "post": "create"},
        "model-version-list",
    ),
    _route(
        "models/<str:model_name>/versions/<int:number>/",
        views.ModelVersionViewSet,
        {"get": "retrieve"},
        "model-version-detail",
    ),
    _route(
        "models/<str:model_name>/versions/<int:number>/download/",
        views.ModelVersionViewSet,
        {"get": "download"},
        "model-version-download",
        pagination_class=None,  # one list of artifacts, never paginated
    ),
    _route(
        "models/<str:model_name>/versions/<int:number>/lineage/",
        views.ModelVersionViewSet,
        {"get": "lineage"},
        "model-version-lineage",
    ),
    _route(
        "models/<str:model_name>/versions/<int:number>/edge-bundle/",
        views.ModelVersionViewSet,
        {"get": "edge_bundle"},
        "model-version-edge-bundle",
    ),
    _route(
        "models/<str:model_name>/aliases/",
        views.ModelAliasViewSet,
        {"get": "list"},
        "model-alias-list",
    ),
    _route(
        "models/<str:model_name>/aliases/<str:alias>/",
        views.ModelAliasViewSet,
        {"get": "retrieve", "put": "update", "delete": "destroy"},
        "model-alias-detail",
    ),
]
