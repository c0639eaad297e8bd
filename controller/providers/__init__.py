"""Where slaves come from: one module per provider, behind the interface in ``base``.

Providers are looked up by their short name, imported only when used (so the
local provider never imports boto3 or paramiko).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from controller.errors import ConfigError
from controller.providers.base import NO_HOOKS, Hooks, Provider, SshTarget

if TYPE_CHECKING:
    from controller.config import Config
    from controller.store import Store

REGISTRY: dict[str, str] = {
    "local": "controller.providers.local:LocalProvider",
    "ssh": "controller.providers.ssh:SshProvider",
    "aws": "controller.providers.aws:AwsProvider",
}


def provider_class(name: str) -> type[Provider]:
    try:
        module_name, class_name = REGISTRY[name].split(":")
    except KeyError:
        raise ConfigError(f"provider {name!r}: expected one of {', '.join(REGISTRY)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def make_provider(name: str, config: "Config", store: "Store", hooks: Hooks = NO_HOOKS) -> Provider:
    """The provider of that name for this config and store (``hooks``: tests only)."""
    return provider_class(name)(config, store, hooks)


__all__ = ["Hooks", "NO_HOOKS", "Provider", "SshTarget", "REGISTRY", "make_provider", "provider_class"]
