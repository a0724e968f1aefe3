"""Where the client finds its server and key: the environment first, then a named profile in the
user's config file, as the AWS and Hugging Face tools do."""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROFILE = "default"
DEFAULT_URL = "http://127.0.0.1:8000"


class ConfigError(Exception):
    """The configuration is missing something the command needs; the message says what to do."""


def config_dir() -> Path:
    """The user's config directory for factory: $XDG_CONFIG_HOME/factory, %APPDATA%\\factory on
    Windows, else ~/.config/factory."""
    if base := os.environ.get("XDG_CONFIG_HOME"):
        return Path(base) / "factory"
    if os.name == "nt" and (appdata := os.environ.get("APPDATA")):
        return Path(appdata) / "factory"
    return Path.home() / ".config" / "factory"


def cache_dir() -> Path:
    """Where unfinished uploads are remembered between runs: $XDG_CACHE_HOME/factory or
    ~/.cache/factory."""
    if base := os.environ.get("XDG_CACHE_HOME"):
        return Path(base) / "factory"
    return Path.home() / ".cache" / "factory"


def config_path() -> Path:
    return config_dir() / "config.ini"


@dataclass(frozen=True)
class Config:
    url: str
    api_key: str
    # The organization's slug; empty means "the one the key belongs to", asked of the server.
    org: str = ""
    profile: str = DEFAULT_PROFILE


def load(profile: str | None = None) -> Config:
    """FACTORY_URL, FACTORY_API_KEY and FACTORY_ORG override the profile's values; the profile is
    `profile`, else $FACTORY_PROFILE, else `default`."""
    name = profile or os.environ.get("FACTORY_PROFILE") or DEFAULT_PROFILE
    parser = _read()
    stored = dict(parser[name]) if parser.has_section(name) else {}
    url = os.environ.get("FACTORY_URL") or stored.get("url") or DEFAULT_URL
    api_key = os.environ.get("FACTORY_API_KEY") or stored.get("api_key", "")
    org = os.environ.get("FACTORY_ORG") or stored.get("org", "")
    if not api_key:
        raise ConfigError(
            f"No API key for profile {name!r}: run `factory login`, or set FACTORY_API_KEY."
        )
    return Config(url=url.rstrip("/"), api_key=api_key, org=org, profile=name)


def save_profile(config: Config) -> Path:
    """Write the profile into the config file, readable by its owner only (mode 0600), keeping
    the other profiles as they were."""
    parser = _read()
    if not parser.has_section(config.profile):
        parser.add_section(config.profile)
    section = parser[config.profile]
    section["url"] = config.url
    section["api_key"] = config.api_key
    section["org"] = config.org
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created 0600 from the start, so the key is never readable by others even for a moment;
    # fchmod covers a file that already existed with a wider mode.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        if hasattr(os, "fchmod"):  # POSIX; Windows keeps the file in the user's profile
            os.fchmod(file.fileno(), 0o600)
        parser.write(file)
    return path


def _read() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config_path())
    return parser
