"""The bundle-writing transaction: stage, write, verify, swap in, recover.

``write_bundle(directory, write, verify)`` is the one way a bundle reaches a directory; an
exporter (``export.onnx.to_onnx``) fills in ``write(staging) -> Manifest`` and
``verify(staging)``:
1. **check**: ``directory`` must be missing, empty or hold a diffopt bundle and nothing
   else; other files are never touched (the export is refused before any work);
2. **stage**: a hidden sibling ``.<name>.partial-*`` holding the exporting process's id;
   stagings of earlier exports whose process is gone are removed first;
3. **write** and **verify** there;
4. **swap**: the old bundle is renamed to ``retired_name``, the new one renamed in, and
   only then is the old one removed; a failure anywhere removes the staging and leaves the
   old bundle as it was;
5. **recover**: a process killed between the two renames leaves the old bundle at its
   retired name, which the next load (``Manifest.load``) or export renames back
   (``recover_interrupted_swap``).
A symbolic link as ``directory`` is followed: the bundle goes where it points.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from diffopt.runtime.bundle import Manifest

OWNER_FILE = ".export-pid"  # in a staging directory: the exporting process, for stale-staging cleanup


class ExportError(RuntimeError):
    """A bundle cannot be written (a variant cannot be exported for the requested profile, or
    the target directory holds something that is not a bundle)."""


def write_bundle(directory: str | Path, write: Callable[[Path], Manifest], verify: Callable[[Path], None]) -> Manifest:
    """The bundle ``write`` makes, verified by ``verify``, in ``directory`` (see the module
    docstring); its manifest."""
    directory = Path(directory)
    if directory.is_symlink():  # a link to where the user keeps bundles: the bundle goes there, the link stays
        directory = directory.resolve()
    recover_interrupted_swap(directory)
    _check_target(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    (staging / OWNER_FILE).write_text(str(os.getpid()))
    try:
        manifest = write(staging)
        verify(staging)
        _swap_in(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _check_target(directory: Path) -> None:
    """Refuse, before any work, a target that is a file, that is not a loadable diffopt bundle,
    or that holds files besides its bundle's: only a bundle of ours is ever replaced."""
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory} exists and is not a directory: choose a directory for the bundle")
    if not directory.exists():
        return
    present = {entry.name for entry in directory.iterdir()}
    if not present:
        return
    try:
        bundle_files = set(Manifest.load(directory, verify_checksums=False).files)
    except (FileNotFoundError, ValueError) as error:
        raise ExportError(
            f"{directory} is not empty and holds no loadable diffopt bundle ({error}); its files {sorted(present)[:8]} "
            f"are left alone: export into a new or empty directory (nothing was written)"
        ) from None
    others = sorted(present - bundle_files)
    if others:
        raise ExportError(
            f"{directory} holds files that are not part of a diffopt bundle: {others[:8]}; export into a new or "
            f"empty directory (nothing was written)"
        )


def _remove_stale_partials(directory: Path) -> None:
    """Remove the staging directories of earlier exports to ``directory`` whose process is gone
    (killed exports); a running export's staging (its process alive) is left alone."""
    for staging in directory.parent.glob(f".{directory.name}.partial-*"):
        owner = staging / OWNER_FILE
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None or not _process_alive(pid):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(staging: Path, directory: Path) -> None:
    """Replace ``directory`` by ``staging``: the old bundle is renamed away, the new one
    renamed in, and only then is the old one removed. A process killed between the two
    renames leaves the old bundle at ``retired_name``, which the next load or export of
    ``directory`` renames back (``recover_interrupted_swap``)."""
    (staging / OWNER_FILE).unlink()
    if not directory.exists():
        os.rename(staging, directory)
        return
    retired = retired_name(directory)
    os.rename(directory, retired)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(retired, directory)
        raise
    shutil.rmtree(retired)


def retired_name(directory: Path) -> Path:
    """Where an export moves the bundle it replaces, for the moment between its two renames."""
    return directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")


def recover_interrupted_swap(directory: Path) -> bool:
    """If ``directory`` is missing but an export that replaced it was killed between its two
    renames (``retired_name`` exists), rename the retired bundle back. Returns whether it did."""
    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        return False
    retired = sorted(directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not retired:
        return False
    try:
        os.rename(retired[-1], directory)
    except FileExistsError:  # another process recovered it first
        return False
    return True
