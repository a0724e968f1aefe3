from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("billing/credits", views.CreditGrantViewSet, basename="credit-grant")

# Mounted under /api/v1/orgs/<org_slug>/.
org_urlpatterns = [
    *router.urls,
    path("billing/account/", views.BillingAccountView.as_view(), name="billing-account"),
]
