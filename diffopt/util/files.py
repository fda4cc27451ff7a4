"""Files the project writes and reads: written whole or not at all, read with errors naming the file.

``replacing(path)`` gives a temporary file beside ``path`` and renames it over ``path``
(``os.replace``, atomic) only once it is complete and on disk: an interrupted write, a
full disk or a crash leaves the previous file as it was. ``replacing_together(paths)`` does
it for a set of files that belong together: every file is written first, then all are
renamed in, so an interrupted write leaves the whole previous set (only a kill between the
final renames can mix sets, which is why such sets also carry a run id that readers check).
``read_json`` turns every way a JSON file can be unreadable (missing, not UTF-8, not JSON, nested too deeply) into one
``ValueError`` that names the file and what it should have been.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Write to the yielded temporary path; at the end of the block it replaces ``path``
    (keeping ``path``'s permissions, or the umask's for a new file). On an error the
    temporary file is removed and ``path`` is untouched."""
    with _staged(Path(path)) as (temporary, commit):
        yield temporary
        commit()


@contextlib.contextmanager
def replacing_together(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """``replacing`` for several files: write each to its yielded temporary path; at the end
    of the block all replace their paths, in order. On an error nothing is replaced."""
    with contextlib.ExitStack() as stack:
        temporaries = [stack.enter_context(_staged(Path(path))) for path in paths]
        yield [temporary for temporary, _ in temporaries]
        for _, commit in temporaries:
            commit()


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[tuple[Path, Any]]:
    """(temporary path, a function that moves it over ``path``); the temporary file is removed
    if the block fails before the move."""
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)

    def commit() -> None:
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(temporary, path)

    try:
        yield temporary, commit
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``path`` replaced by ``text`` (UTF-8), all or nothing (``replacing``)."""
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON value in ``path``, or a ``ValueError`` naming the file and ``what`` it should be
    (e.g. "a pass file") when it is missing, not UTF-8, not JSON or nested too deeply."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not {what}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not {what}: not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{path} is not {what}: its JSON is nested too deeply") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
