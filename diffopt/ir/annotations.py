"""The one typed per-node annotation: ``node.meta["diffopt"]``.

Passes record their decision for a node here (mode, rank, bits, and the reason when a
layer falls back); reports and export read it and never re-derive decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

META_KEY = "diffopt"


@dataclass
class NodeAnnotation:
    """What a pass decided for one node."""

    mode: str  # e.g. "original", "delta", "calibrated", "full"
    owner: str  # name of the pass that made the decision
    reason: str | None = None  # why: required when a layer falls back or is left alone
    rank: int | None = None
    bits: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


def annotate(node: fx.Node, annotation: NodeAnnotation) -> None:
    node.meta[META_KEY] = annotation


def annotation_of(node: fx.Node) -> NodeAnnotation | None:
    return node.meta.get(META_KEY)
