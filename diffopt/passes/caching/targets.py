"""Cache targets: what a cache stands in for, found in the graph by block metadata.

Every target kind selects ``CacheTarget`` values from one place (``ir.blocks``):
- ``span``: runs of consecutive selected blocks of a chain; each run's value is its
  residual ``out - in`` (``value="residual"``) or its output (``value="output"``, as
  diffusers' TaylorSeer hook on blocks forecasts hidden states), one per stream;
- ``blocks``: each selected block on its own (any block, UNet down/up blocks included):
  its residual where the block keeps its input's shape, else its output;
- ``modules``: the attention and feed-forward modules inside the selected blocks (or the
  modules ``modules=`` names, regular expressions); their outputs;
- ``after_first``: the span of every block after the chain's first (first-block caching).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import fx

from diffopt.ir.blocks import all_blocks, block_chain, block_streams, first_and_last_streams, selected_blocks
from diffopt.passes.base import PassNotApplicable
from diffopt.util.validation import block_names, chain_names

TARGETS: dict[str, type[Target]] = {}
VALUES = ("residual", "output")
_DEFAULT_MODULE_CLASSES = re.compile(r"Attention|FeedForward|MLP|Mlp")


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: ``cls`` can be named by its ``kind`` in a pass file."""
    TARGETS[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class CacheTarget:
    """One value stood in for: a module's output, or the residual / output of blocks
    ``first..last``; one per stream where blocks pass several on (SD3 / Flux joint blocks)."""

    name: str  # the module, or "first..last" for a span (".streamK" where several)
    first: str
    last: str
    output: str  # the node ``last`` passes this value on as (variants keep node names)
    head: str | None = None  # the node of ``first``'s stream it continues, for a residual; None: an output


class Target:
    """Base of the target kinds: ``select(graph, owner)`` lists the ``CacheTarget`` values."""

    kind: ClassVar[str]

    def select(self, graph: fx.Graph, owner: str) -> list[CacheTarget]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@dataclass(frozen=True)
class _ChainTarget(Target):
    blocks: tuple[str, ...] | None = None  # None: every block of the chain
    container: str | tuple[str, ...] | None = None  # the chain(s), see ir.blocks.block_chain

    def __post_init__(self) -> None:
        object.__setattr__(self, "container", chain_names(f"{self.kind} target", self.container))
        object.__setattr__(self, "blocks", block_names(f"{self.kind} target", self.blocks))

    def _selected(self, graph: fx.Graph, owner: str) -> tuple[list[str], list[str]]:
        chain = block_chain(graph, self.container, owner)
        return chain, selected_blocks(chain, self.blocks, owner, "the chain's blocks")


def span_targets(graph: fx.Graph, chain: list[str], selected: list[str], value: str) -> list[CacheTarget]:
    """The runs of consecutive ``selected`` blocks of ``chain``, one target per stream."""
    spans: list[list[str]] = []
    for block in selected:
        if spans and chain.index(block) == chain.index(spans[-1][-1]) + 1:
            spans[-1].append(block)
        else:
            spans.append([block])
    targets = []
    for span in spans:
        pairs = first_and_last_streams(graph, span[0], span[-1])[1]
        for index, (head, tail) in enumerate(pairs):
            suffix = f".stream{index}" if len(pairs) > 1 else ""
            head_name = head.output.name if value == "residual" else None
            targets.append(
                CacheTarget(f"{span[0]}..{span[-1]}{suffix}", span[0], span[-1], tail.output.name, head_name)
            )
    return targets


@register_target
@dataclass(frozen=True)
class Span(_ChainTarget):
    kind: ClassVar[str] = "span"
    value: str = "residual"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.value not in VALUES:
            raise ValueError(f"span target: value must be one of {VALUES}, found {self.value!r}")

    def select(self, graph, owner):
        return span_targets(graph, *self._selected(graph, owner), self.value)


@register_target
@dataclass(frozen=True)
class AfterFirst(_ChainTarget):
    kind: ClassVar[str] = "after_first"
    value: str = "residual"

    def select(self, graph, owner):
        chain, _ = self._selected(graph, owner)
        if len(chain) < 2:
            raise PassNotApplicable(f"{owner}: the chain {chain} has no block after its first")
        return span_targets(graph, chain, chain[1:], self.value)


@register_target
@dataclass(frozen=True)
class Blocks(Target):
    kind: ClassVar[str] = "blocks"
    blocks: tuple[str, ...] | None = None  # None: every block that passes a tensor on

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", block_names("blocks target", self.blocks))

    def select(self, graph, owner):
        found = all_blocks(graph)
        blocks = {block: block_streams(graph, block) for block in selected_blocks(found, self.blocks, owner)}
        skipped = {block: "passes no tensor on" for block, streams in blocks.items() if not streams}
        if skipped and self.blocks is None:
            warnings.warn(f"{owner} skips blocks {skipped}", stacklevel=2)
        targets = []
        for block, streams in blocks.items():
            for index, stream in enumerate(streams):
                suffix = f".stream{index}" if len(streams) > 1 else ""
                head = stream.output.name if stream.hidden_input is not None else None
                targets.append(CacheTarget(f"{block}{suffix}", block, block, stream.output.name, head))
        if not targets:
            raise PassNotApplicable(f"{owner}: no block passes a tensor on; blocks: {found}")
        return targets


@register_target
@dataclass(frozen=True)
class Modules(_ChainTarget):
    kind: ClassVar[str] = "modules"
    modules: tuple[str, ...] | None = None  # regular expressions (full match); None: attention / feed-forward

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modules is not None:
            object.__setattr__(self, "modules", block_names("modules target", self.modules, field="modules"))
            for pattern in self.modules:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"modules target: {pattern!r} is not a regular expression: {error}") from None

    def select(self, graph, owner):
        _, selected = self._selected(graph, owner)
        children = child_modules(graph, selected)
        chosen = [
            name
            for name, class_name in children.items()
            if (
                any(re.fullmatch(p, name) for p in self.modules)
                if self.modules is not None
                else _DEFAULT_MODULE_CLASSES.search(class_name)
            )
        ]
        if not chosen:
            raise PassNotApplicable(
                f"{owner}: no module to forecast or cache in blocks {selected}; their submodules are "
                f"{sorted(children.items())}: name some with modules=, or target blocks"
            )
        targets = []
        for name in chosen:
            streams = block_streams(graph, name)
            for index, stream in enumerate(streams):
                suffix = f".stream{index}" if len(streams) > 1 else ""
                targets.append(CacheTarget(f"{name}{suffix}", name, name, stream.output.name))
        return targets


def child_modules(graph: fx.Graph, blocks: list[str]) -> dict[str, str]:
    """The direct submodules of ``blocks`` that produced nodes, name -> class name, in graph order."""
    found: dict[str, str] = {}
    for node in graph.nodes:
        for path, class_name in (node.meta.get("nn_module_stack") or {}).values():
            name = path.split(".", 1)[1] if "." in path else ""
            parent, _, _ = name.rpartition(".")
            if parent in blocks:
                found.setdefault(name, str(getattr(class_name, "__name__", class_name)).rsplit(".", 1)[-1])
    return found
