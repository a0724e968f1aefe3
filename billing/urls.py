from django.urls import path

from . import views

app_name = "billing"

# Mounted at /o/<org_slug>/; every view here is org-scoped (OrganizationPageMixin).
urlpatterns = [
    path("billing/", views.BillingPage.as_view(), name="billing"),
    path("billing/usage/", views.UsagePage.as_view(), name="usage"),
    path("billing/usage.csv", views.UsageCsvDownload.as_view(), name="usage_csv"),
    path("billing/invoices/<int:pk>/", views.InvoicePage.as_view(), name="invoice"),
    path("billing/invoices/<int:pk>/pdf/", views.InvoicePdfDownload.as_view(), name="invoice_pdf"),
]

urlpatterns += [
    path("billing/checkout/", views.CheckoutPage.as_view(), name="checkout"),
    path("billing/portal/", views.PortalPage.as_view(), name="portal"),
]
