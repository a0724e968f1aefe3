from django.urls import path

from . import views

app_name = "webhooks"

# Mounted under /o/<org_slug>/; every view is org-scoped (OrganizationPageMixin).
urlpatterns = [
    path("webhooks/", views.EndpointsPage.as_view(), name="endpoints"),
    path("webhooks/<int:pk>/", views.EndpointPage.as_view(), name="endpoint"),
    path("webhooks/<int:pk>/rotate/", views.EndpointRotatePage.as_view(), name="endpoint_rotate"),
    path("webhooks/<int:pk>/test/", views.EndpointTestAction.as_view(), name="endpoint_test"),
    path("webhooks/<int:pk>/delete/", views.EndpointDeleteAction.as_view(), name="endpoint_delete"),
    path("webhooks/deliveries/<int:pk>/", views.DeliveryPage.as_view(), name="delivery"),
    path(
        "webhooks/deliveries/<int:pk>/resend/",
        views.DeliveryResendAction.as_view(),
        name="delivery_resend",
    ),
]
