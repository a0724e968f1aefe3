from django.urls import path

from . import views

app_name = "billing"

# Mounted at /o/<org_slug>/; every view here is org-scoped (OrganizationPageMixin).
urlpatterns = [
    path("billing/", views.BillingPage.as_view(), name="billing"),
]
