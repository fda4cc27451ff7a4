"""Where registries (passes, backends) find their classes, and how plugins join them.

A registry filled by a decorator sees a class once its module is imported:
``import_package`` imports every module of one of diffopt's packages, once per process.

A plugin is a module outside diffopt that registers passes or backends when imported. It
joins a process in one of three ways, each of which every process (the CLI included) sees:
- an installed entry point in a group of ``PLUGIN_GROUPS`` (``diffopt.passes``,
  ``diffopt.backends``, ``diffopt.runtimes``), loaded the first time a registry is read;
- ``DIFFOPT_PLUGINS``: module names separated by commas, loaded at the same time;
- ``load_plugin(module)``, which the CLI's ``--plugin MODULE`` calls.
``loaded_plugins`` lists them in load order, so a recorded command can name them again.
A class can also be named as ``"package.module:Class"`` (``imported_class``), which imports
its module.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import pkgutil

PLUGIN_GROUPS = ("diffopt.passes", "diffopt.backends", "diffopt.runtimes")
PLUGINS_VARIABLE = "DIFFOPT_PLUGINS"
_LOADED: dict[str, str] = {}  # plugin module -> how it came ("--plugin", the variable or its entry point)


@functools.cache
def import_package(name: str) -> None:
    """Import every module of package ``name`` (each registers what it defines), then the
    installed and named plugins (``load_installed_plugins``)."""
    package = importlib.import_module(name)
    for module in pkgutil.iter_modules(package.__path__, f"{name}."):
        importlib.import_module(module.name)
    load_installed_plugins()


def load_plugin(module: str, source: str = "--plugin") -> str:
    """Import plugin ``module`` (once) and record it; a ``ValueError`` naming it and ``source``
    when it cannot be imported."""
    if not isinstance(module, str) or not module.strip() or ":" in module:
        raise ValueError(f"{source}: a plugin is a module name (package.module), found {module!r}")
    module = module.strip()
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"{source}: cannot import plugin {module!r}: {error}") from None
    _LOADED.setdefault(module, source)
    return module


@functools.cache
def load_installed_plugins() -> None:
    """Load the modules of ``DIFFOPT_PLUGINS`` and of every entry point in ``PLUGIN_GROUPS``
    (once per process)."""
    for module in filter(None, (name.strip() for name in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        load_plugin(module, PLUGINS_VARIABLE)
    for group in PLUGIN_GROUPS:
        for entry_point in importlib.metadata.entry_points(group=group):
            load_plugin(entry_point.module, f"entry point {entry_point.name!r} in group {group!r}")


def loaded_plugins() -> dict[str, str]:
    """The plugin modules this process loaded, in order, each with how it came."""
    return dict(_LOADED)


def register_named(registry: dict[str, type], cls: type, decorator: str, methods: tuple[str, ...] = ()) -> type:
    """``registry[cls.name] = cls`` for a class decorator named ``decorator``; a ``TypeError``
    when ``cls`` has no str ``name`` or lacks one of ``methods``."""
    missing = [method for method in methods if not callable(getattr(cls, method, None))]
    if not isinstance(getattr(cls, "name", None), str) or missing:
        raise TypeError(f"{decorator}: {cls!r} needs a str `name`" + "".join(f" and a `{m}` method" for m in missing))
    registry[cls.name] = cls
    return cls


def imported_class(reference: str, base: type, where: str) -> type:
    """The class ``"package.module:Class"`` names, which must subclass ``base``; a
    ``ValueError`` naming ``where`` otherwise."""
    module, _, name = reference.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{where}: cannot import {reference!r}: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{where}: {reference!r} is not a {base.__name__}")
    return cls


def class_reference(cls: type) -> str:
    """``"package.module:Class"`` of ``cls``, the form ``imported_class`` reads."""
    return f"{cls.__module__}:{cls.__qualname__}"
