from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("webhooks", views.WebhookEndpointViewSet, basename="webhook")
router.register("webhook-deliveries", views.WebhookDeliveryViewSet, basename="webhook-delivery")

# Mounted under /api/v1/orgs/<org_slug>/ by the project's API router.
org_urlpatterns = [*router.urls]
