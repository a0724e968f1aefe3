from django.urls import include, path

from .views import pages

app_name = "tenants"

# Every view under /o/<org_slug>/ is org-scoped (OrganizationPageMixin).
org_urlpatterns = [
    path("", pages.OverviewPage.as_view(), name="overview"),
    path("settings/", pages.SettingsPage.as_view(), name="settings"),
    path("members/", pages.MembersPage.as_view(), name="members"),
    path("members/<int:pk>/role/", pages.MemberRoleAction.as_view(), name="member_role"),
    path("members/<int:pk>/remove/", pages.MemberRemoveAction.as_view(), name="member_remove"),
    path(
        "invitations/<int:pk>/revoke/",
        pages.InvitationRevokeAction.as_view(),
        name="invitation_revoke",
    ),
    path("keys/", pages.ApiKeysPage.as_view(), name="api_keys"),
    path("keys/<int:pk>/revoke/", pages.ApiKeyRevokeAction.as_view(), name="api_key_revoke"),
    path("audit/", pages.AuditPage.as_view(), name="audit"),
]

urlpatterns = [
    path("orgs/new/", pages.OrganizationCreatePage.as_view(), name="organization_create"),
    path("profile/", pages.ProfilePage.as_view(), name="profile"),
    path("invitations/accept/", pages.InvitationAcceptPage.as_view(), name="invitation_accept"),
    path("o/<slug:org_slug>/", include(org_urlpatterns)),
]
