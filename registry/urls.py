from django.urls import path

from . import views

app_name = "registry"

# Mounted at /o/<org_slug>/; every view here is org-scoped (OrganizationPageMixin).
urlpatterns = [
    path("datasets/", views.DatasetsPage.as_view(), name="datasets"),
    path("datasets/<str:name>/", views.DatasetPage.as_view(), name="dataset"),
    path(
        "datasets/<str:name>/v/<int:number>/",
        views.DatasetVersionPage.as_view(),
        name="dataset_version",
    ),
    path(
        "datasets/<str:name>/v/<int:number>/download/",
        views.DatasetVersionDownload.as_view(),
        name="dataset_version_download",
    ),
    path("code/", views.CodePackagesPage.as_view(), name="code_packages"),
    path("code/<str:name>/", views.CodePackagePage.as_view(), name="code_package"),
    path(
        "code/<str:name>/v/<int:number>/",
        views.CodePackageVersionPage.as_view(),
        name="code_package_version",
    ),
    path("models/", views.ModelsPage.as_view(), name="models"),
    path("models/<str:name>/", views.ModelPage.as_view(), name="model"),
    path(
        "models/<str:name>/v/<int:number>/", views.ModelVersionPage.as_view(), name="model_version"
    ),
]
