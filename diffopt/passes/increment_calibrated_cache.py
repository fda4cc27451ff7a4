"""Increment-calibrated caching (ICC): cached linear outputs corrected by a low-rank increment.

Before: every step computes ``y = W x + b`` in each token-wise linear layer of the
repeated blocks (attention q/k/v/out, MLP in/out).
After: two variants. ``full`` computes as before and stores ``x_c = x``, ``y_c = y`` in
state; ``calibrated`` computes ``y = y_c + A (B (x - x_c))`` with ``A B ~= W`` of rank r
(no bias: it is inside ``y_c``) and leaves the cache unchanged, so the reference stays
the last full step; layers that read one input (q, k, v) share one cached input.
Everything else (softmax, GELU, LayerNorm, adaLN modulation, gates, residual adds) is
computed live on the corrected values. The schedule refreshes every
``period`` steps, or, with ``refresh_threshold``, adaptively: a ``probe`` variant computes
the first cached layer's input and its relative increment ``mean|x - x_c| / mean|x_c|``
(the quantity the low-rank correction linearises, so its error grows with it), and the
step refreshes when that exceeds the threshold. Rank 0 is plain reuse ``y = y_c`` (the FORA-style baseline: work that
only fed cached layers is removed from the graph); full rank reproduces the model.

Token-wise means the layer's input has a token axis (rank >= 3); modulation and
timestep-embedding linears (batch x channels) stay live. The policy can exclude layers
(``{"cache": False}``) or set per-layer ``rank``; ``mac_budget`` instead chooses each
layer's rank so that the low-rank paths cost a given fraction of the cached layers' full
MACs, spending ranks where they keep the most spectral energy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from diffopt.ir.annotations import NodeAnnotation, annotate
from diffopt.ir.blocks import all_blocks, selected_blocks
from diffopt.ir.graph_tools import (
    add_variant,
    finish_probe,
    insert_relative_change,
    node_named,
    remove_dead_code,
    state_shape,
    thread_state,
)
from diffopt.ir.layers import linear_layers, require_blocks
from diffopt.ir.program import StepProgram
from diffopt.ir.schedules import AdaptiveSchedule, Schedule
from diffopt.ir.specs import CALIBRATED, FULL, PROBE, StateEntry
from diffopt.passes.base import (
    PassContext,
    PassKind,
    PassNotApplicable,
    VariantPass,
    register_pass,
)
from diffopt.passes.low_rank import low_rank_factors, ranks_under_budget
from diffopt.util.validation import block_names, require_int, require_number

aten = torch.ops.aten
FACTORIZATIONS = {"svd": None, "channel-aware": "input", "channel-aware-increment": "increment"}


@register_pass
@dataclass(frozen=True)
class IncrementCalibratedCachePass(VariantPass):
    kind: ClassVar[str] = PassKind.CACHE
    after: ClassVar[tuple[str, ...]] = (PassKind.TEMPORAL_DIFFERENCE,)

    rank: int | None = 32  # None: full rank (exact); 0: plain reuse of cached outputs
    period: int = 2
    factorization: str = "svd"  # "svd", "channel-aware" (|activation|) or "channel-aware-increment"
    blocks: tuple[str, ...] | None = None  # block module names (e.g. "transformer_blocks.2"); None: all
    refresh_threshold: float | None = None  # adaptive schedule instead of `period` (see the module docstring)
    mac_budget: float | None = None  # ranks chosen per layer so the low-rank paths cost this fraction of the
    #                                  cached layers' full MACs; replaces `rank` where the policy sets none

    def __post_init__(self) -> None:
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"unknown factorization {self.factorization!r}: expected one of {list(FACTORIZATIONS)}")
        require_int(self.name, "rank", self.rank, minimum=0, optional=True)
        require_int(self.name, "period", self.period, minimum=1)
        require_number(self.name, "refresh_threshold", self.refresh_threshold, minimum=0.0, optional=True)
        require_number(self.name, "mac_budget", self.mac_budget, minimum=0.0, maximum=1.0, optional=True)
        if self.mac_budget == 0:
            raise ValueError(f"{self.name}.mac_budget is a fraction in (0, 1], found 0")
        object.__setattr__(self, "blocks", block_names(self.name, self.blocks))

    @property
    def needs_calibration(self) -> bool:
        return FACTORIZATIONS[self.factorization] is not None

    def check_model(self, model: torch.nn.Module) -> None:
        require_blocks(model, self.blocks, self.name)

    def _block_members(self, graph: fx.Graph) -> list[str]:
        return selected_blocks(all_blocks(graph), self.blocks, self.name)

    def _select(self, graph: fx.Graph, context: PassContext) -> list[tuple[fx.Node, str, int | None]]:
        blocks = self._block_members(graph)
        chosen = []
        for node, name in linear_layers(graph).items():
            if node.target != aten.linear.default:
                continue
            if not any(name.startswith(block + ".") for block in blocks):
                continue
            settings = context.policy.resolve(name, "linear")
            if node.args[0].meta["val"].dim() < 3:
                annotate(
                    node,
                    NodeAnnotation(
                        "original", self.name, reason="not token-wise (modulation or embedding): computed live"
                    ),
                )
            elif settings.get("cache", True) is False:
                annotate(node, NodeAnnotation("original", self.name, reason="excluded by the layer policy"))
            else:
                chosen.append((node, name, settings.get("rank", _BUDGET if self.mac_budget is not None else self.rank)))
        return chosen

    def _budget_ranks(self, module: fx.GraphModule, layers: list, context: PassContext) -> list:
        """Replace the placeholder ranks of budgeted layers by ``ranks_under_budget``'s choice."""
        budgeted = [i for i, (_, _, rank) in enumerate(layers) if rank is _BUDGET]
        if not budgeted:
            return layers
        ranks = ranks_under_budget(
            [(_weight(module, layers[i][0]), *self._channel_weights(layers[i][1], context)) for i in budgeted],
            self.mac_budget,
        )
        chosen = dict(zip(budgeted, ranks))
        return [(node, layer, chosen.get(i, rank)) for i, (node, layer, rank) in enumerate(layers)]

    def _channel_weights(self, layer: str, context: PassContext):
        """(input channel weights, output channel weights) for channel-aware SVD; (None, None) for plain SVD."""
        kind = FACTORIZATIONS[self.factorization]
        if kind is None:
            return None, None
        statistics = context.require_statistics(self.name).activations
        return statistics.channel_weights(layer, kind), statistics.channel_weights(layer, "output")

    def _factors(self, layer: str, rank: int, weight: torch.Tensor, context: PassContext):
        return low_rank_factors(weight, rank, *self._channel_weights(layer, context))

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram:
        full_module = program.variants[FULL]
        layers = self._select(full_module.graph, context)
        if not layers:
            raise PassNotApplicable(
                f"{self.name}: no token-wise linear layer in blocks {self._block_members(full_module.graph)} "
                f"is left to cache (the policy excluded them, or the blocks have none)"
            )
        layers = self._budget_ranks(full_module, layers, context)
        calibrated_module = add_variant(program, CALIBRATED, copy_of=FULL)
        probe = add_variant(program, PROBE, copy_of=FULL) if self.refresh_threshold is not None else None
        probe_increment: list[fx.Node] = []  # (x, x_c) of the first cached layer in the probe
        shared_inputs: dict[str, dict[str, fx.Node]] = {}  # input node name -> variant -> its cached input
        for index, (node, layer, rank) in enumerate(layers):
            weight = _weight(full_module, node)
            out_features, in_features = weight.shape
            effective_rank = min(in_features, out_features) if rank is None else min(rank, in_features, out_features)
            inputs = StateEntry(
                f"{layer}.cached_input", state_shape(node.args[0]), node.args[0].meta["val"].dtype, self.name
            )
            outputs = StateEntry(f"{layer}.cached_output", state_shape(node), node.meta["val"].dtype, self.name)
            reused = node.args[0].name in shared_inputs  # q, k and v read one input: one cached copy
            cached_input = shared_inputs.setdefault(node.args[0].name, {})

            def store_input(variant, graph, state_input, node_name=node.name):
                cached_input[variant] = state_input
                if variant == PROBE and not probe_increment:
                    probe_increment.extend((node_named(graph, node_name).args[0], state_input))
                return node_named(graph, node_name).args[0] if variant == FULL else state_input

            def store_output(
                variant, graph, state_input, node_name=node.name, index=index, rank=effective_rank, weight=weight
            ):
                linear = node_named(graph, node_name)
                if variant == PROBE:
                    return state_input
                if variant == FULL:
                    annotate(linear, NodeAnnotation(FULL, self.name, rank=rank, details={"period": self.period}))
                    return linear
                corrected = _calibrated_output(
                    calibrated_module,
                    graph,
                    linear,
                    cached_input[variant],
                    state_input,
                    self._factors(layer, rank, weight, context) if rank else None,
                    index,
                )
                annotate(
                    corrected,
                    NodeAnnotation(
                        CALIBRATED,
                        self.name,
                        rank=rank,
                        details={"layer": layer, "period": self.period, "factorization": self.factorization},
                    ),
                )
                return state_input

            if not reused:
                program = thread_state(program, inputs, store_input)
            program = thread_state(program, outputs, store_output)
        remove_dead_code(calibrated_module)
        schedule = Schedule(FULL, CALIBRATED, self.period)
        if probe is not None:
            finish_probe(probe, insert_relative_change(probe.graph, *probe_increment))
            schedule = AdaptiveSchedule(PROBE, self.refresh_threshold, refresh=FULL, between=CALIBRATED)
        return dataclasses.replace(program, schedule=schedule)


_BUDGET = object()  # marks a layer whose rank the MAC budget decides


def _weight(module: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    if node.args[1].op != "get_attr":
        raise ValueError(f"layer {node.name}: weight is not a graph attribute; cannot factorise it")
    return module.get_parameter(node.args[1].target)


def _calibrated_output(
    module: fx.GraphModule,
    graph: fx.Graph,
    linear: fx.Node,
    cached_input: fx.Node,
    cached_output: fx.Node,
    factors: tuple[torch.Tensor, torch.Tensor] | None,
    index: int,
) -> fx.Node:
    """Replace ``linear`` by ``y_c + A (B (x - x_c))`` (or ``y_c`` without factors)."""
    if factors is None:
        corrected = cached_output
    else:
        a_name, b_name = f"icc_{index}_a", f"icc_{index}_b"
        module.register_buffer(a_name, factors[0])
        module.register_buffer(b_name, factors[1])
        with graph.inserting_before(linear):
            increment = graph.call_function(aten.sub.Tensor, (linear.args[0], cached_input))
            reduced = graph.call_function(aten.linear.default, (increment, graph.get_attr(b_name)))
            correction = graph.call_function(aten.linear.default, (reduced, graph.get_attr(a_name)))
            corrected = graph.call_function(aten.add.Tensor, (cached_output, correction))
    linear.replace_all_uses_with(corrected)
    graph.erase_node(linear)
    return corrected
