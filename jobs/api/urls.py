from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("jobs", views.JobViewSet, basename="job")

# Mounted under /api/v1/orgs/<org_slug>/.
org_urlpatterns = router.urls

urlpatterns = [
    path("recipes/", views.RecipeListView.as_view(), name="recipe-list"),
    path("resource-classes/", views.ResourceClassListView.as_view(), name="resource-class-list"),
]
