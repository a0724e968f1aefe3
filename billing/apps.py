from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"

    def ready(self):
        from tenants.standing import standing_provider_register

        from . import receivers  # noqa: F401  subscribes to tenants' signals once models load
        from .selectors import organization_standing

        # Past due and a reached hard cap stop spending on every API action and page, not only
        # new placements.
        standing_provider_register(organization_standing)
