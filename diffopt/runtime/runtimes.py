"""Bundle runtimes: executors opened from an exported bundle, looked up by name.

``load_bundle(directory, runtime="onnxruntime")`` opens the bundle (``Bundle.open``: the
manifest, checked by ``Manifest.load``), builds the runtime registered under that name on it
(``cls(bundle, **options)``: an ``Executor`` over the bundle's variant files), and returns an
``OptimizedDenoiser`` that runs it and carries the ``Bundle``, so callers read the manifest
from ``denoiser.bundle``, never from the executor. A runtime joins with
``@register_runtime`` in any module diffopt imports: its own ``runtime`` package, a plugin
(``util.plugins``: the ``diffopt.runtimes`` entry point group, ``DIFFOPT_PLUGINS``,
``--plugin``). Adding one (OpenVINO, TensorRT) is one file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffopt.runtime.bundle import Manifest
from diffopt.runtime.denoiser import OptimizedDenoiser
from diffopt.util.plugins import import_package, register_named

DEFAULT_RUNTIME = "onnxruntime"
RUNTIMES: dict[str, type] = {}


@dataclass(frozen=True)
class Bundle:
    """An exported bundle: its directory and its checked manifest."""

    directory: Path
    manifest: Manifest

    @classmethod
    def open(cls, directory: str | Path, verify_checksums: bool = True) -> Bundle:
        """The bundle in ``directory``, its manifest checked (``verify_checksums=False``
        skips hashing the files, for huge bundles)."""
        directory = Path(directory)
        return cls(directory, Manifest.load(directory, verify_checksums=verify_checksums))


def register_runtime(cls: type) -> type:
    """Class decorator: ``cls`` (built as ``cls(bundle, **options)``, an ``Executor``) is
    known by ``cls.name``."""
    return register_named(RUNTIMES, cls, "register_runtime")


def registered_runtimes() -> dict[str, type]:
    """Every registered bundle runtime by name (diffopt's ``runtime`` modules and the plugins imported first)."""
    import_package("diffopt.runtime")
    return dict(RUNTIMES)


def load_bundle(
    directory: str | Path, runtime: str = DEFAULT_RUNTIME, *, verify_checksums: bool = True, **options: Any
) -> OptimizedDenoiser:
    """An ``OptimizedDenoiser`` running the bundle in ``directory`` on ``runtime`` (a
    registered name), built with ``options`` (onnxruntime's: ``threads``, ``providers``).
    Inputs and state live on the runtime's device."""
    known = registered_runtimes()
    if runtime not in known:
        raise ValueError(f"load_bundle(): runtime must be one of {sorted(known)}, found {runtime!r}")
    bundle = Bundle.open(directory, verify_checksums)
    executor = known[runtime](bundle, **options)
    interface = dataclasses.replace(bundle.manifest.interface(), device=executor.device)
    return OptimizedDenoiser(interface, backend=executor, bundle=bundle)
