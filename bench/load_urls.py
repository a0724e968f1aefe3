"""The app's URLs plus bench/load.py's baselines; served only through bench/load_settings.py.

`bench/bare/` ("bare DRF", what the targets compare with) is the smallest DRF endpoint behind an
API key read the way a DRF app reads one, and the way the product read it when issue 15 set its
targets: one ORM query per request, the key with its organization and creator (as DRF's own
TokenAuthentication reads a token with its user), then its hash compared; a constant JSON body,
no queries of its own. `bench/key/` is the same view behind the product's authentication as it
is now (a statement compiled once per process: tenants.selectors.api_key_get_by_token), the floor
every /api/v1/ request pays. `bench/open/` is the same view with no authentication at all.
"""

import hmac

from django.db.models import OuterRef, Subquery
from django.urls import path
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from factory_saas.urls import urlpatterns as app_urlpatterns
from tenants.api.authentication import ApiKeyAuthentication
from tenants.models import ApiKey, Membership
from tenants.selectors import hash_secret


def orm_api_key_get_by_token(*, token: str) -> ApiKey | None:
    """The product's key lookup before it was compiled (git 5bf3ae3): the queryset built and
    compiled on every request."""
    prefix, sep, secret = token.partition("_")
    if not sep or not secret:
        return None
    creator_role = Membership.objects.filter(
        organization=OuterRef("organization"), user=OuterRef("created_by")
    ).values("role")[:1]
    api_key = (
        ApiKey.objects.select_related("organization", "created_by")
        .annotate(creator_role=Subquery(creator_role))
        .filter(prefix=prefix)
        .first()
    )
    if api_key is None or not hmac.compare_digest(api_key.secret_hash, hash_secret(secret)):
        return None
    return api_key


class OrmApiKeyAuthentication(ApiKeyAuthentication):
    key_lookup = staticmethod(orm_api_key_get_by_token)


class BareApiKeyView(APIView):
    """Behind the product's default authentication classes, API key first."""

    permission_classes = [IsAuthenticated]

    def get(self, request):
        return Response({"ok": True})


class BareDrfView(BareApiKeyView):
    authentication_classes = [OrmApiKeyAuthentication]


class BareOpenView(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    def get(self, request):
        return Response({"ok": True})


urlpatterns = [
    path("api/v1/bench/bare/", BareDrfView.as_view()),
    path("api/v1/bench/key/", BareApiKeyView.as_view()),
    path("api/v1/bench/open/", BareOpenView.as_view()),
    *app_urlpatterns,
]
