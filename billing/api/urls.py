from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("billing/credits", views.CreditGrantViewSet, basename="credit-grant")
router.register("billing/invoices", views.InvoiceViewSet, basename="invoice")

# Mounted under /api/v1/orgs/<org_slug>/.
org_urlpatterns = [
    *router.urls,
    path("billing/account/", views.BillingAccountView.as_view(), name="billing-account"),
    path("billing/usage/", views.UsageReportView.as_view(), name="billing-usage"),
    path("billing/usage/export/", views.UsageExportView.as_view(), name="billing-usage-export"),
]

org_urlpatterns += [
    path("billing/checkout/", views.CheckoutSessionView.as_view(), name="billing-checkout"),
    path("billing/portal/", views.PortalSessionView.as_view(), name="billing-portal"),
]
