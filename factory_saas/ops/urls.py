"""The /ops/ pages; their names stay unprefixed (`ops_overview`, `ops_pool`, `ops_billing`)."""

from django.urls import path

from .views import OpsBillingPage, OpsOverviewPage, PoolPage, RuntimesPage

urlpatterns = [
    path("", OpsOverviewPage.as_view(), name="ops_overview"),
    path("pool/", PoolPage.as_view(), name="ops_pool"),
    path("billing/", OpsBillingPage.as_view(), name="ops_billing"),
    path("runtimes/", RuntimesPage.as_view(), name="ops_runtimes"),
]
