from django.conf import settings
from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path
from django.views.generic import RedirectView

from billing.views import stripe_webhook

from . import health, views
from .metrics import metrics_view

dashboard_patterns = ([path("", views.home, name="home")], "dashboard")

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),
    # Staff sign in through the same throttled form as everyone else.
    path(
        "admin/login/",
        RedirectView.as_view(pattern_name="account_login", query_string=True),
        name="admin_login_redirect",
    ),
    path("admin/", admin.site.urls),
    path("accounts/", include("allauth.urls")),
    path("api/v1/", include("factory_saas.api")),
    path("billing/stripe/webhook/", stripe_webhook, name="stripe_webhook"),
    path("", include(dashboard_patterns)),
    path("", include("tenants.urls")),
    path("o/<slug:org_slug>/", include("registry.urls")),
    path("o/<slug:org_slug>/", include("jobs.urls")),
    path("o/<slug:org_slug>/", include("serving.urls")),
    path("o/<slug:org_slug>/", include("billing.urls")),
    path("o/<slug:org_slug>/", include("webhooks.urls")),
    path("ops/", include("factory_saas.ops.urls")),
    path("", include("registry.storage_views")),
]

if settings.DEBUG:
    urlpatterns += staticfiles_urlpatterns()
