"""Checks of user-given parameters: each error names the owner and the field, says what
was expected and what was found."""

from __future__ import annotations

import math
import re
from typing import Any


def require_int(owner: str, field: str, value, minimum: int | None = None, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``owner.field`` unless ``value`` is an int (>= ``minimum``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        expected = "an int" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if optional else "")
        raise ValueError(f"{owner}.{field} must be {expected}, found {value!r}")


def require_number(
    owner: str, field: str, value, minimum: float | None = None, maximum: float | None = None, optional: bool = False
) -> None:
    """Raise ``ValueError`` naming ``owner.field`` unless ``value`` is a finite number in range."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bounds = " ".join(
            part
            for part in (f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else "")
            if part
        )
        expected = f"a finite number {bounds}".rstrip() + (" or None" if optional else "")
        raise ValueError(f"{owner}.{field} must be {expected}, found {value!r}")


def chain_names(owner: str, container):
    """``container`` (which chain(s) of blocks a pass walks): a name, several names as a
    tuple (a JSON list reads back as one), or None."""
    if container is None or (isinstance(container, str) and container):
        return container
    if isinstance(container, list | tuple) and container and all(isinstance(n, str) and n for n in container):
        return tuple(container)
    raise ValueError(
        f"{owner}.container must name a chain of blocks ('transformer_blocks') or several to join "
        f"(('transformer_blocks', 'single_transformer_blocks')), found {container!r}"
    )


def block_names(owner: str, blocks, field: str = "blocks") -> tuple[str, ...] | None:
    """``blocks`` as a tuple of (block or module) names (None stays None); a bare string is
    refused, since iterating it would give its characters."""
    if blocks is None:
        return None
    if isinstance(blocks, str) or not all(isinstance(block, str) for block in blocks):
        raise ValueError(
            f"{owner}.{field} must be a tuple of names such as ('transformer_blocks.1',), found {blocks!r}"
        )
    if not blocks:
        raise ValueError(f"{owner}.{field} is empty: pass None for every one, or name some")
    return tuple(blocks)


def register_word(registry: set[str], name: Any, what: str) -> str:
    """Add ``name`` to ``registry`` and return it; a ``ValueError`` naming ``what`` unless it is a
    lowercase word (letters, digits, ``-``). Open vocabularies (variant roles, pass kinds) use it."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise ValueError(f"{what} is a lowercase word (letters, digits, '-'), found {name!r}")
    registry.add(name)
    return name
