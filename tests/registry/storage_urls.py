"""URLconf for storage tests: the local backend's signed-URL views, mounted as the project does."""

from django.urls import include, path

urlpatterns = [path("", include("registry.storage_views"))]
