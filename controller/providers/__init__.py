"""Where slaves come from: one module per provider, behind the interface in ``base``.

Providers are looked up by their short name, imported only when used (so the
local provider never imports boto3 or paramiko).
"""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Provider, SshTarget

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


__all__ = ["Provider", "SshTarget", "REGISTRY", "provider_class"]
