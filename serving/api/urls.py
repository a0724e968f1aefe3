"""Deployment routes, mounted under /api/v1/orgs/<org_slug>/."""

from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("deployments", views.DeploymentViewSet, basename="deployment")
router.register("retrains", views.RetrainViewSet, basename="retrain")

org_urlpatterns = router.urls
