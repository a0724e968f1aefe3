from django.urls import path

from . import views

app_name = "serving"

# Mounted at /o/<org_slug>/; every view here is org-scoped (OrganizationPageMixin).
urlpatterns = [
    path("deployments/", views.DeploymentsPage.as_view(), name="deployments"),
    path("deployments/<slug:name>/", views.DeploymentPage.as_view(), name="deployment"),
    path(
        "deployments/<slug:name>/routes/",
        views.DeploymentRoutesAction.as_view(),
        name="deployment_routes",
    ),
    path(
        "deployments/<slug:name>/retrains/<int:pk>/",
        views.RetrainPage.as_view(),
        name="retrain",
    ),
    path(
        "deployments/<slug:name>/retrains/<int:pk>/approve/",
        views.RetrainApproveAction.as_view(),
        name="retrain_approve",
    ),
    path(
        "deployments/<slug:name>/retrains/<int:pk>/reject/",
        views.RetrainRejectAction.as_view(),
        name="retrain_reject",
    ),
]
