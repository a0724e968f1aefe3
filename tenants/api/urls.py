from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("members", views.MemberViewSet, basename="member")
router.register("invitations", views.InvitationViewSet, basename="invitation")
router.register("api-keys", views.ApiKeyViewSet, basename="api-key")
router.register("audit-events", views.AuditEventViewSet, basename="audit-event")

# Mounted under /api/v1/orgs/<org_slug>/ by the project's API router.
org_urlpatterns = [
    path("", views.OrganizationDetailView.as_view(), name="organization-detail"),
    *router.urls,
]

urlpatterns = [
    path("orgs/", views.OrganizationListView.as_view(), name="organization-list"),
    path("invitations/accept/", views.InvitationAcceptView.as_view(), name="invitation-accept"),
]
