from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("jobs", views.JobViewSet, basename="job")
router.register("sweeps", views.SweepViewSet, basename="sweep")

# Mounted under /api/v1/orgs/<org_slug>/.
org_urlpatterns = [
    *router.urls,
    path("models/<str:name>/predict/", views.ModelPredictView.as_view(), name="model-predict"),
]

urlpatterns = [
    path("recipes/", views.RecipeListView.as_view(), name="recipe-list"),
    path("resource-classes/", views.ResourceClassListView.as_view(), name="resource-class-list"),
]
