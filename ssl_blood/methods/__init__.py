"""Self-supervised methods, one module each, registered by name (solo-learn's METHODS registry)."""

import importlib
import pkgutil

from ssl_blood.methods.base import (Method, MethodSetup, build_method, default_method_config,
                                    method_class, method_names, register)

__all__ = ["Method", "MethodSetup", "build_method", "default_method_config", "method_class",
           "method_names", "register"]


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_discover()
