from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants"

    def ready(self):
        from .api import schema  # noqa: F401  registers the API-key scheme with drf-spectacular
