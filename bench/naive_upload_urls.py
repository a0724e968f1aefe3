"""The app's URLs plus a naive upload view that reads the whole body into memory.

Served only by the baseline gunicorn of bench/upload_memory.py (through bench/settings_naive.py).
"""

from django.http import JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from factory_saas.urls import urlpatterns as app_urlpatterns


@csrf_exempt
@require_POST
def naive_upload(request):
    return JsonResponse({"bytes": len(request.body)})


urlpatterns = [path("bench/naive-upload", naive_upload), *app_urlpatterns]
