from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"

    def ready(self):
        from . import receivers  # noqa: F401  subscribes to tenants' signals once models load
