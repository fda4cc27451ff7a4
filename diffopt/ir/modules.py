"""Registries filled by decorators (passes, backends) see a class once its module is
imported: ``import_package`` imports every module of a package, once per process."""

from __future__ import annotations

import functools
import importlib
import pkgutil


@functools.cache
def import_package(name: str) -> None:
    """Import every module of package ``name`` (each registers what it defines)."""
    package = importlib.import_module(name)
    for module in pkgutil.iter_modules(package.__path__, f"{name}."):
        importlib.import_module(module.name)
