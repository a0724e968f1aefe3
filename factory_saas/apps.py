from django.apps import AppConfig


class FactorySaasConfig(AppConfig):
    name = "factory_saas"
    verbose_name = "factory_saas"
