"""The factory_saas Python client and the `factory` command line, with no Django in them."""

from factory_sdk.client import VERSION as __version__
from factory_sdk.client import Client, FactoryError
from factory_sdk.config import Config, ConfigError

__all__ = ["Client", "Config", "ConfigError", "FactoryError", "__version__"]
