"""Length shortcuts (ODEl, METHODS.md section 3): a depth knob for a DiT's block chain.

``LengthShortcutPass`` rewires the captured chain of D blocks into the accumulated-
displacement form with group size G, and makes one variant ``depth{l}`` per supported
depth l (multiples of G). Before: ``h_{i+1} = Block_i(h_i, c)``, the head reads ``h_D``.
After, in variant ``depth{l}``::

    a = h0;  v = 0;  current = h0;  c' = c + LenEmb[l / G]
    block i < l:  o = Block_i(current, c')
        end of a group:  a = a + o;  v = v + o;  current = a
        inside a group:  current = o
    the head reads v (and c')

Blocks l .. D-1 are not in that variant's graph at all (dead code once the head reads
``v``), so a shallow step costs only its blocks. ``G = D`` with no embedding is the
unmodified model, ``G = l`` at depth l the model naively truncated after l blocks. The
rewired model needs the length-consistency fine-tuning
(``diffopt.evaluation.training.train_length_shortcut``); without it quality collapses.

Block discovery (``ir.layers.find_blocks``) finds the chain as the model's indexed
children: diffusers' ``DiTTransformer2DModel`` and ``PixArtTransformer2DModel`` both keep
it in ``transformer_blocks.{i}``. The conditioning the length embedding joins is found
as follows (or named with ``conditioning=``, a module path inside each block):

- a floating ``(batch, dim)`` input that every block shares (a hand-written DiT's ``c``;
  PixArt's adaLN-single ``timestep``, dim = 6 x hidden);
- otherwise each block's ``norm1.emb`` output (diffusers' DiT with ``ada_norm_zero``
  embeds timestep and class inside every block; its head calls block 0's embedder
  again, and that call gets the length embedding as well).

The depth of a variant is fixed, so the embedding row enters its graph as a constant
(``length_embedding``), not as a run-time input; the step program's schedule picks the
depth per step (``depth_schedule``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx

from diffopt.ir.blocks import block_boundary, block_chain
from diffopt.ir.graph_tools import add_variant, module_scopes, node_named, remove_dead_code
from diffopt.ir.layers import require_chain
from diffopt.ir.program import StepProgram
from diffopt.ir.schedules import ListSchedule
from diffopt.ir.specs import FULL
from diffopt.passes.base import PassContext, PassKind, PassNotApplicable, VariantPass, register_pass
from diffopt.util.validation import chain_names, require_int

aten = torch.ops.aten
DIT_CONDITIONING = "norm1.emb"  # diffusers' ada_norm_zero blocks embed (timestep, class) here


def depth_variant(depth: int) -> str:
    return f"depth{depth}"


def depth_schedule(depths: int | Sequence[int]) -> ListSchedule:
    """The schedule running ``depth{l}`` at every step (an int), or ``depths[k]`` at step k
    (a list with one depth per sampling step, e.g. shallow early and deep late)."""
    if isinstance(depths, int):
        depths = [depths]
    for depth in depths:
        require_int("depth_schedule", "depth", depth, minimum=1)
    return ListSchedule(tuple(depth_variant(d) for d in depths))


@register_pass
@dataclass(frozen=True)
class LengthShortcutPass(VariantPass):
    kind: ClassVar[str] = PassKind.LENGTH
    after: ClassVar[tuple[str, ...]] = (PassKind.CACHE, PassKind.TEMPORAL_DIFFERENCE)

    group_size: int = 1
    depths: tuple[int, ...] | None = None  # None: every multiple of group_size up to the chain's length
    # (D // G + 1, dim): row l / G joins the conditioning at depth l; None: no length embedding
    length_embedding: torch.Tensor | None = field(default=None, repr=False, compare=False)
    conditioning: str | None = None  # a module path inside each block (e.g. "norm1.emb"); None: found
    container: str | tuple[str, ...] | None = None  # the chain(s) of blocks, see block_chain; None: the only one
    schedule: int | tuple[int, ...] | None = None  # depth per step (see depth_schedule); None: the deepest

    def __post_init__(self) -> None:
        object.__setattr__(self, "container", chain_names(self.name, self.container))
        require_int(self.name, "group_size", self.group_size, minimum=1)
        if self.depths is not None:
            object.__setattr__(self, "depths", tuple(self.depths))
            for depth in self.depths:
                require_int(self.name, "depth", depth, minimum=1)
        if self.length_embedding is not None and (
            not isinstance(self.length_embedding, torch.Tensor) or self.length_embedding.dim() != 2
        ):
            raise ValueError(f"{self.name}: length_embedding must be a 2-d tensor (D // G + 1, dim)")
        if isinstance(self.schedule, list):
            object.__setattr__(self, "schedule", tuple(self.schedule))

    def check_model(self, model: torch.nn.Module) -> None:
        require_chain(model, self.container, self.name)

    def _depths(self, num_blocks: int) -> tuple[int, ...]:
        supported = tuple(range(self.group_size, num_blocks + 1, self.group_size))
        depths = self.depths or supported
        unsupported = sorted(set(depths) - set(supported))
        if unsupported:
            raise ValueError(
                f"{self.name}: depths {unsupported} are not multiples of {self.group_size} up to {num_blocks}"
            )
        if not supported:
            raise PassNotApplicable(
                f"{self.name}: group_size {self.group_size} exceeds the chain's {num_blocks} blocks"
            )
        if self.length_embedding is not None and len(self.length_embedding) != num_blocks // self.group_size + 1:
            raise ValueError(
                f"{self.name}: length_embedding has {len(self.length_embedding)} rows; a chain of {num_blocks} "
                f"blocks in groups of {self.group_size} needs {num_blocks // self.group_size + 1}"
            )
        return tuple(sorted(set(depths)))

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram:
        graph = program.variants[FULL].graph
        blocks = block_chain(graph, self.container, self.name)
        depths = self._depths(len(blocks))
        for block in blocks:
            if block_boundary(graph, block).hidden_input is None:
                raise PassNotApplicable(f"{self.name}: {block!r} changes its input's shape; the chain must be residual")
        conditioning = self._conditioning(graph, blocks)
        for depth in depths:
            module = add_variant(program, depth_variant(depth), copy_of=FULL)
            self._rewire(module.graph, blocks, depth)
            if self.length_embedding is not None:
                row = self.length_embedding[depth // self.group_size]
                _join(module, [node_named(module.graph, node.name) for node in conditioning], row)
            remove_dead_code(module)
        del program.variants[FULL]
        schedule = depth_schedule(self.schedule if self.schedule is not None else max(depths))
        missing = sorted(set(schedule.variants) - set(program.variants))
        if missing:
            raise ValueError(f"{self.name}: schedule uses {missing}; the variants are {sorted(program.variants)}")
        return dataclasses.replace(program, schedule=schedule)

    def _conditioning(self, graph: fx.Graph, blocks: list[str]) -> list[fx.Node]:
        """The nodes the length embedding joins (see the module docstring)."""
        if self.length_embedding is None:
            return []
        dim = self.length_embedding.shape[1]
        if self.conditioning is not None:
            nodes = [node for block in blocks for node in _module_outputs(graph, f"{block}.{self.conditioning}")]
            if not nodes:
                raise ValueError(f"{self.name}: no block has a module {self.conditioning!r}; blocks: {blocks}")
        else:
            shared = set.intersection(*(set(_block_inputs(graph, block)) for block in blocks))
            nodes = [n for n in graph.nodes if n in shared and _is_batch_vector(n)]
            if not nodes:
                nodes = [node for block in blocks for node in _module_outputs(graph, f"{block}.{DIT_CONDITIONING}")]
            if not nodes:
                raise PassNotApplicable(
                    f"{self.name}: found no conditioning: the blocks share no (batch, dim) input and have no "
                    f"{DIT_CONDITIONING!r}; name the module with conditioning="
                )
        wrong = [n.name for n in nodes if not _is_batch_vector(n) or n.meta["val"].shape[1] != dim]
        if wrong:
            raise ValueError(
                f"{self.name}: the conditioning {wrong} is not (batch, {dim}) like length_embedding's rows"
            )
        return nodes

    def _rewire(self, graph: fx.Graph, blocks: list[str], depth: int) -> None:
        """Rewire ``graph``'s chain into the accumulated form truncated at ``depth``."""
        boundaries = [block_boundary(graph, block) for block in blocks]
        chain_output = boundaries[-1].output
        outside = [user for user in chain_output.users if not any(b in module_scopes(user) for b in blocks)]
        a = current = boundaries[0].hidden_input
        v = None
        for index in range(depth):
            boundary = block_boundary(graph, blocks[index])
            if boundary.hidden_input is not current:
                members = [n for n in graph.nodes if blocks[index] in module_scopes(n)]
                for node in members:
                    node.replace_input_with(boundary.hidden_input, current)
            o = boundary.output
            if (index + 1) % self.group_size:
                current = o
                continue
            with graph.inserting_after(o):
                a = _add(graph, a, o)
                if v is not None:
                    with graph.inserting_after(a):
                        v = _add(graph, v, o)
                else:
                    v = o
            current = a
        for user in outside:
            user.replace_input_with(chain_output, v)


def _add(graph: fx.Graph, left: fx.Node, right: fx.Node) -> fx.Node:
    node = graph.call_function(aten.add.Tensor, (left, right))
    node.meta["val"] = left.meta["val"]  # later block lookups match inputs by shape
    return node


def _module_outputs(graph: fx.Graph, path: str) -> list[fx.Node]:
    """The value each call of module ``path`` returns (one per call)."""
    members = {node for node in graph.nodes if path in module_scopes(node)}
    return [node for node in graph.nodes if node in members and any(u not in members for u in node.users)]


def _block_inputs(graph: fx.Graph, block: str) -> list[fx.Node]:
    members = {node for node in graph.nodes if block in module_scopes(node)}
    return [arg for node in members for arg in node.all_input_nodes if arg not in members]


def _is_batch_vector(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 2


def _join(module: fx.GraphModule, conditioning: list[fx.Node], row: torch.Tensor) -> None:
    """Make everything that reads a node of ``conditioning`` read it plus ``row`` instead."""
    graph = module.graph
    module.register_buffer("length_embedding", row.detach().clone().to(conditioning[0].meta["val"].dtype))
    for node in conditioning:
        with graph.inserting_after(node):
            embedding = graph.get_attr("length_embedding")
            with graph.inserting_after(embedding):
                joined = _add(graph, node, embedding)
        node.replace_all_uses_with(joined, delete_user_cb=lambda user, joined=joined: user is not joined)
