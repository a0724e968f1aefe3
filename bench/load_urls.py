"""The app's URLs plus bench/load.py's two baselines; served only through bench/load_settings.py.

`bench/bare/` is the smallest DRF endpoint behind the product's authentication (the API key
lookup, as every /api/v1/ request pays it): a constant JSON body, no tenant, no queries of its
own. `bench/open/` is the same view with no authentication at all.
"""

from django.urls import path
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from factory_saas.urls import urlpatterns as app_urlpatterns


class BareApiKeyView(APIView):
    # The project's default authentication classes, API key first, like every product view.
    permission_classes = [IsAuthenticated]

    def get(self, request):
        return Response({"ok": True})


class BareOpenView(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    def get(self, request):
        return Response({"ok": True})


urlpatterns = [
    path("api/v1/bench/bare/", BareApiKeyView.as_view()),
    path("api/v1/bench/open/", BareOpenView.as_view()),
    *app_urlpatterns,
]
