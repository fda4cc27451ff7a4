"""Temporal-difference linear layers (Ditto): process the change of an input, not the input.

Before: every step computes ``y = op(x, W) + b`` (Linear / Conv).
After: variant ``full`` (step 0) computes as before and stores the layer's previous
input and output in state; variant ``delta`` (every later step) computes
``y = y_prev + op(d, W)`` without bias (it is inside ``y_prev``), where, per ``mode``:

- ``exact``: ``d = x - x_prev``; equals the model up to float rounding.
- ``integer`` (Ditto's identity): ``c = Q(x; s_x)`` with ONE static per-layer scale,
  ``d = c - c_prev`` in integers, and the accumulator ``acc = acc_prev + op(d, W_c)`` is
  exact (``linear_ops.IntegerLinear``), so the output equals the A8W8 model
  (``StaticQuantizationPass``) bit for bit while most codes of ``d`` are zero or small.
- ``difference``: ``d = Q(x - x̂_prev; s_d) * s_d`` with its own static scale (the
  difference's range is ~10x narrower than the input's, so ``bits`` codes on it are
  far more accurate than on ``x``); error feedback stores ``x̂ = x̂_prev + d``, the input
  for which ``y = op(x̂, W) + b`` holds, so quantization errors do not accumulate.
- ``dynamic`` (linear layers; convolutions stay full): as ``difference``, but the
  difference is quantized per call to uint8 with its own range (onnxruntime's
  ``DynamicQuantizeLinear``; no calibration) and the delta matmul uses int8 weights per
  output channel: ``y = y_prev + d @ W8``. Exported, this is the pattern onnxruntime fuses
  into its integer GEMM kernels (``quantized_ops``).

Layers that share an input (attention q/k/v) share one previous-input state and one
difference. ``row_threshold`` (linear ops): token rows whose difference has
``max|d| <= row_threshold * (calibrated max |x_t - x_prev| of the layer)`` are skipped
(gather the active rows, a smaller matmul, scatter-add into ``y_prev``); the previous
input then only advances on active rows, so skipped changes are applied once they grow.
``row_threshold=0`` skips only rows that are exactly zero (lossless). The policy can
keep layers in full mode (``{"mode": "full"}``; in integer mode they are A8W8, so the
program still equals the A8W8 model); ``DefoPass`` decides that per layer.
``refresh_period`` recomputes a full step every that many steps (None: step 0 only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from diffopt.ir.annotations import NodeAnnotation, annotate, annotation_of
from diffopt.ir.graph_tools import add_variant, node_named, remove_dead_code, state_shape, thread_state
from diffopt.ir.layers import linear_layers, op_name
from diffopt.ir.program import StepProgram
from diffopt.ir.schedules import Schedule
from diffopt.ir.specs import DELTA, FULL, StateEntry
from diffopt.passes.base import PassContext, PassKind, VariantPass, register_pass
from diffopt.passes.composition import rewrite_every_variant
from diffopt.passes.linear_ops import (
    IntegerLinear,
    call_like,
    constant,
    int8_weight_columns,
    operand_bits,
    quantize_op,
    to_dtype,
)
from diffopt.quant.arithmetic import insert_quantize, symmetric_scale
from diffopt.quant.ops import insert_dequantize_weight, insert_fake_quantize
from diffopt.util.validation import require_int, require_number

aten = torch.ops.aten
GROUP_KEY = "diffopt_layer_group"  # node meta: the layer group (first layer's name) a delta node computes for
GROUP_INPUT_KEY = "diffopt_layer_group_input"  # node meta: the group whose layers read this node
MODES = ("exact", "integer", "difference", "dynamic")
CALIBRATION_FREE_MODES = ("exact", "dynamic")


@register_pass
@dataclass(frozen=True)
class TemporalDifferencePass(VariantPass):
    kind: ClassVar[str] = PassKind.TEMPORAL_DIFFERENCE
    first_variants: ClassVar[bool] = False  # composes over the variants of a cache pass before it

    mode: str = "exact"
    bits: int = 8  # integer / dynamic: 8 only; difference: bits of the difference codes
    row_threshold: float | None = None  # linear ops: skip token rows with small differences (module docstring)
    refresh_period: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: expected one of {MODES}")
        require_int(self.name, "bits", self.bits, minimum=2)
        require_number(self.name, "row_threshold", self.row_threshold, minimum=0.0, optional=True)
        require_int(self.name, "refresh_period", self.refresh_period, minimum=1, optional=True)
        if self.mode in ("integer", "dynamic") and self.bits != 8:
            raise ValueError(f"{self.mode} mode quantizes to 8 bits: bits must be 8")
        if self.row_threshold is not None and self.mode not in ("exact", "difference"):
            raise ValueError("row skipping (row_threshold) applies to the exact and difference modes")

    @property
    def needs_calibration(self) -> bool:
        return self.mode not in CALIBRATION_FREE_MODES or self.row_threshold is not None

    def selected_layers(self, graph: fx.Graph, context: PassContext) -> dict[fx.Node, str]:
        """Ops to rewrite (with their layer names); the others are annotated with the
        reason they stay full."""
        chosen = {}
        for op, layer in linear_layers(graph).items():
            settings = context.policy.resolve(layer, op_name(op))
            if self.mode == "dynamic" and op.target != aten.linear.default:
                settings = {"mode": FULL, "reason": "dynamic mode covers matmuls (onnxruntime's integer kernels)"}
            if settings.get("mode", DELTA) == FULL:
                annotate(
                    op,
                    NodeAnnotation(
                        FULL,
                        self.name,
                        reason=settings.get("reason", "the layer policy says full"),
                        details={"layer": layer},
                    ),
                )
            else:
                chosen[op] = layer
        return chosen

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram | None:
        selected = [self.selected_layers(module.graph, context) for module in program.variants.values()]
        if not any(selected) and self.mode != "integer":  # nothing to rewrite; only "kept full" annotations
            return None
        apart = _layers_reading_inputs_shared_differently(program)
        return rewrite_every_variant(program, lambda single: self._rewrite(single, context, apart))

    def _rewrite(self, program: StepProgram, context: PassContext, apart: set[str]) -> StepProgram:
        """One-variant program -> ``full`` / ``delta`` (module docstring)."""
        full_module = program.variants[FULL]
        layers = self.selected_layers(full_module.graph, context)
        kept = {op.name: layer for op, layer in linear_layers(full_module.graph).items() if op not in layers}
        add_variant(program, DELTA, copy_of=FULL)
        groups: dict[str, dict[fx.Node, str]] = {}
        for op, layer in layers.items():
            groups.setdefault(layer if layer in apart else op.args[0].name, {})[op] = layer
        # every group reads its shapes before any is rewritten (one op's output can be another's input)
        for group in [_LayerGroup(self, context, program, ops, index) for index, ops in enumerate(groups.values())]:
            program = group.rewrite(program)
        if self.mode == "integer":
            self._quantize_full_layers(program, context, kept)
        for module in program.variants.values():
            remove_dead_code(module)
        return dataclasses.replace(program, schedule=Schedule(FULL, DELTA, self.refresh_period))

    def _quantize_full_layers(self, program: StepProgram, context: PassContext, kept: dict[str, str]) -> None:
        """Integer mode computes the A8W8 model: the layers ``kept`` full (node name -> layer)
        are A8W8 too, not float."""
        statistics = context.require_statistics(self.name).temporal
        for module in program.variants.values():
            for index, (node_name, layer) in enumerate(kept.items()):
                op = node_named(module.graph, node_name)
                quantize_op(
                    module,
                    op,
                    layer,
                    symmetric_scale(statistics.input_range(layer), 8),
                    8,
                    8,
                    f"a8w8_{index}",
                    self.name,
                    mode=FULL,
                    reason=annotation_of(op).reason,
                )


class _LayerGroup:
    """Ops reading the same input: one previous-input state, one difference, and one
    previous-output state per op."""

    def __init__(
        self,
        spec: TemporalDifferencePass,
        context: PassContext,
        program: StepProgram,
        layers: dict[fx.Node, str],
        index: int,
    ):
        self.spec, self.program, self.context = spec, program, context
        self.ops, self.names = list(layers), list(layers.values())
        self.full_module = program.variants[FULL]
        self.layer, self.index = self.names[0], index
        source = self.ops[0].args[0]
        self.input_shape, self.input_dtype = state_shape(source), source.meta["val"].dtype
        self.row_skip = spec.row_threshold is not None and all(op.target == aten.linear.default for op in self.ops)
        statistics = context.require_statistics(spec.name).temporal if spec.needs_calibration else None
        if spec.mode == "integer":
            self.input_scale = symmetric_scale(statistics.input_range(self.layer), 8)
            self.integer = [
                IntegerLinear(self.full_module, op, self.input_scale, f"ditto_{index}_{i}")
                for i, op in enumerate(self.ops)
            ]
        if spec.mode == "difference":
            self.difference_scale = symmetric_scale(statistics.difference_range(self.layer), spec.bits)
        if spec.mode == "dynamic":
            self.difference_scale = None  # computed per call
            self.weights = [int8_weight_columns(self.full_module, op) for op in self.ops]
        # onnxruntime turns a 2-D MatMul + Add into a float Gemm before its integer fusions run, so
        # dynamic mode quantizes a (batch, channels) difference as (batch, 1, channels)
        self.rows_as_matrix = spec.mode == "dynamic" and len(self.input_shape) == 2
        if self.row_skip:
            self.row_limit = spec.row_threshold * statistics.difference_range(self.layer)
        self.shared: dict[str, dict[str, fx.Node]] = {}  # variant -> named nodes built for the group

    def rewrite(self, program: StepProgram) -> StepProgram:
        self.program = program
        stored_dtype = torch.int8 if self.spec.mode == "integer" else self.input_dtype
        entry = StateEntry(f"{self.layer}.previous_input", self.input_shape, stored_dtype, self.spec.name)
        program = thread_state(program, entry, self._tagged(self._update_input))
        for position, op in enumerate(self.ops):
            dtype = torch.float64 if self.spec.mode == "integer" else op.meta["val"].dtype
            name = "previous_accumulator" if self.spec.mode == "integer" else "previous_output"
            entry = StateEntry(f"{self.names[position]}.{name}", state_shape(op), dtype, self.spec.name)
            program = thread_state(
                program,
                entry,
                self._tagged(
                    lambda variant, graph, previous, position=position: self._update_output(
                        variant, graph, previous, position
                    )
                ),
            )
        return program

    def _tagged(self, update):
        """``update``, with every node it creates tagged ``meta[GROUP_KEY] = the group's first layer``."""

        def tagging_update(variant: str, graph: fx.Graph, previous: fx.Node) -> fx.Node:
            before = set(graph.nodes)
            result = update(variant, graph, previous)
            for node in graph.nodes:
                if node not in before:
                    node.meta[GROUP_KEY] = self.layer
            return result

        return tagging_update

    def _first_op(self, graph: fx.Graph) -> fx.Node:
        return node_named(graph, self.ops[0].name)

    def _update_input(self, variant: str, graph: fx.Graph, previous: fx.Node) -> fx.Node:
        """Build the group's shared nodes; return the new previous input."""
        x = self._first_op(graph).args[0]
        x.meta[GROUP_INPUT_KEY] = self.layer
        nodes = self.shared.setdefault(variant, {})
        with graph.inserting_before(self._first_op(graph)):
            if self.spec.mode == "integer":
                codes = insert_quantize(graph, x, self.input_scale, 8)
                nodes["codes"] = to_dtype(graph, codes, torch.float64)
                if variant == DELTA:
                    previous_codes = to_dtype(graph, previous, torch.float64)
                    nodes["difference"] = graph.call_function(aten.sub.Tensor, (nodes["codes"], previous_codes))
                return to_dtype(graph, codes, torch.int8)
            if variant == FULL:
                return x
            difference = graph.call_function(aten.sub.Tensor, (x, previous))
            if self.rows_as_matrix:
                difference = graph.call_function(aten.unsqueeze.default, (difference, 1))
            if self.spec.mode in ("difference", "dynamic"):
                difference = insert_fake_quantize(graph, difference, self.difference_scale, self.spec.bits, self.layer)
            nodes["difference"] = difference
            if self.rows_as_matrix:
                difference = graph.call_function(aten.squeeze.dim, (difference, 1))
            if self.row_skip:
                return self._gather_active_rows(graph, nodes, previous)
            return x if self.spec.mode == "exact" else graph.call_function(aten.add.Tensor, (previous, difference))

    def _gather_active_rows(self, graph: fx.Graph, nodes: dict[str, fx.Node], previous: fx.Node) -> fx.Node:
        """Rows of the difference above the limit; returns the previous input advanced on them."""
        channels = self.input_shape[-1]
        rows = graph.call_function(aten.reshape.default, (nodes["difference"], [-1, channels]))
        largest = graph.call_function(aten.amax.default, (graph.call_function(aten.abs.default, (rows,)), [1]))
        active = graph.call_function(aten.gt.Scalar, (largest, self.row_limit))
        nodes["rows"] = graph.call_function(
            aten.view.default, (graph.call_function(aten.nonzero.default, (active,)), [-1])
        )
        nodes["active_difference"] = graph.call_function(aten.index_select.default, (rows, 0, nodes["rows"]))
        flat_previous = graph.call_function(aten.reshape.default, (previous, [-1, channels]))
        advanced = graph.call_function(
            aten.index_add.default, (flat_previous, 0, nodes["rows"], nodes["active_difference"])
        )
        return graph.call_function(aten.view_as.default, (advanced, previous))

    def _update_output(self, variant: str, graph: fx.Graph, previous: fx.Node, position: int) -> fx.Node:
        op = node_named(graph, self.ops[position].name)
        module = self.program.variants[variant]
        nodes = self.shared[variant]
        details = {"layer": self.names[position], "mode": self.spec.mode, "row_threshold": self.spec.row_threshold}
        reason = self.context.policy.resolve(self.names[position], op_name(op)).get("reason")
        with graph.inserting_before(op):
            if self.spec.mode == "integer":
                integer = self.integer[position]
                operand = nodes["codes"] if variant == FULL else nodes["difference"]
                matmul = integer.accumulate(module, graph, op, operand)
                accumulator = matmul if variant == FULL else graph.call_function(aten.add.Tensor, (previous, matmul))
                annotate(
                    matmul,
                    NodeAnnotation(
                        variant, self.spec.name, reason=reason, bits=8, details={**details, **operand_bits("codes", 8)}
                    ),
                )
                op.replace_all_uses_with(integer.dequantize(module, graph, op, accumulator))
                graph.erase_node(op)
                return accumulator
            if variant == FULL:
                annotate(op, NodeAnnotation(FULL, self.spec.name, reason=reason, details=details))
                return op
            output = self._delta_output(graph, op, nodes, previous, position)
        bits = self._delta_operand_bits()
        annotate(
            output[1],
            NodeAnnotation(
                DELTA, self.spec.name, reason=reason, bits=self.spec.bits if bits else None, details={**details, **bits}
            ),
        )
        op.replace_all_uses_with(output[0])
        graph.erase_node(op)
        return output[0]

    def _delta_operand_bits(self) -> dict:
        """Operand widths of a delta matmul, for cost accounting (``operand_bits``)."""
        if self.spec.mode == "dynamic":
            return operand_bits(8, 8)
        return operand_bits("codes", 32, self.difference_scale) if self.spec.mode == "difference" else {}

    def _delta_output(
        self, graph: fx.Graph, op: fx.Node, nodes: dict[str, fx.Node], previous: fx.Node, position: int
    ) -> tuple[fx.Node, fx.Node]:
        """(``y_prev + op(d, W)``, the matmul node), over the active rows only when skipping rows."""
        if self.spec.mode == "dynamic":
            module = self.program.variants[DELTA]
            codes, scale = (
                constant(module, graph, f"ditto_{self.index}_{position}_{name}", value)
                for name, value in zip(("weight_codes", "weight_scale"), self.weights[position])
            )
            weight = insert_dequantize_weight(graph, codes, scale, self.names[position])
            matmul = graph.call_function(aten.matmul.default, (nodes["difference"], weight))
            product = graph.call_function(aten.squeeze.dim, (matmul, 1)) if self.rows_as_matrix else matmul
            return graph.call_function(aten.add.Tensor, (previous, product)), matmul
        if not self.row_skip:
            matmul = call_like(graph, op, nodes["difference"], op.args[1])
            return graph.call_function(aten.add.Tensor, (previous, matmul)), matmul
        matmul = call_like(graph, op, nodes["active_difference"], op.args[1])
        flat_previous = graph.call_function(aten.reshape.default, (previous, [-1, op.meta["val"].shape[-1]]))
        updated = graph.call_function(aten.index_add.default, (flat_previous, 0, nodes["rows"], matmul))
        return graph.call_function(aten.view_as.default, (updated, previous)), matmul


def _layers_reading_inputs_shared_differently(program: StepProgram) -> set[str]:
    """Layers that share their input with different layers in different variants (a cache
    removed some of them). They get a previous input of their own: a shared one would be
    advanced by a variant in which some of the sharing layers do not run."""
    readers: dict[str, set[frozenset[str]]] = {}
    for module in program.variants.values():
        by_input: dict[str, set[str]] = {}
        for op, layer in linear_layers(module.graph).items():
            by_input.setdefault(op.args[0].name, set()).add(layer)
        for layers in by_input.values():
            for layer in layers:
                readers.setdefault(layer, set()).add(frozenset(layers))
    return {layer for layer, groups in readers.items() if len(groups) > 1}


def layer_decisions(program: StepProgram) -> dict[str, tuple[str, str | None]]:
    """Per layer: (mode, reason) as the annotations of the ``delta`` variant (or of ``full``
    when no layer was rewritten) record them; what ``diffopt report`` prints."""
    variant = program.variants.get(DELTA, program.variants[FULL])
    decided = {}
    for node in variant.graph.nodes:
        annotation = annotation_of(node)
        if annotation is not None and "layer" in annotation.details:
            decided[annotation.details["layer"]] = (annotation.mode, annotation.reason)
    return decided
