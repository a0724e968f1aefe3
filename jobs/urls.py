from django.urls import path

from . import views

app_name = "jobs"

# Mounted at /o/<org_slug>/; every view here is org-scoped (OrganizationPageMixin).
urlpatterns = [
    path("jobs/", views.JobsPage.as_view(), name="jobs"),
    path("jobs/new/", views.JobSubmitPage.as_view(), name="job_submit"),
    path("jobs/predict/", views.JobPredictPage.as_view(), name="job_predict"),
    path("code/<str:name>/v/<int:number>/run/", views.CodeRunPage.as_view(), name="code_run"),
    path(
        "models/<str:name>/v/<int:number>/export/",
        views.ModelVersionExportAction.as_view(),
        name="model_version_export",
    ),
    path("jobs/<int:pk>/", views.JobPage.as_view(), name="job"),
    path("jobs/<int:pk>/cancel/", views.JobCancelAction.as_view(), name="job_cancel"),
    path("jobs/<int:pk>/retry/", views.JobRetryAction.as_view(), name="job_retry"),
    path("sweeps/", views.SweepsPage.as_view(), name="sweeps"),
    path("sweeps/<int:pk>/", views.SweepPage.as_view(), name="sweep"),
    path("sweeps/<int:pk>/cancel/", views.SweepCancelAction.as_view(), name="sweep_cancel"),
]
