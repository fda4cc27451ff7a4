"""Read-only analysis of a captured graph: op counts, MACs per call, linear layers, blocks.

MACs are counted by running the graph once on concrete inputs (``measure.interpreter``:
every node's real input and output shapes): linear = out.numel() * in_features,
conv = out.numel() * in_channels/groups * kernel area, matmul-like = out.numel() * K,
attention = batch * heads * L * S * (E_qk + E_v).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from diffopt.ir.graph_tools import module_class, module_path, op_type
from diffopt.ir.layers import LINEAR_OPS, find_blocks
from diffopt.measure.interpreter import NodeHook, run_with_hooks

aten = torch.ops.aten


def node_macs(node: fx.Node, args: Sequence[Any], out: Any) -> int:
    """Multiply-accumulates one aten node performs, given its concrete arguments and result."""
    target = node.target
    if target == aten.linear.default:
        return out.numel() * args[1].shape[1]
    if target in (aten.conv1d.default, aten.conv2d.default):
        weight = args[1]
        return out.numel() * weight[0].numel()
    if target in (aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default, aten.baddbmm.default):
        first = args[1] if target in (aten.addmm.default, aten.baddbmm.default) else args[0]
        return out.numel() * first.shape[-1]
    if target == aten.scaled_dot_product_attention.default:
        q, k, v = args[:3]
        batch_heads = q.numel() // (q.shape[-2] * q.shape[-1])
        return batch_heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


class MacCounter(NodeHook):
    """Records the MACs of every node that does any."""

    def __init__(self):
        self.macs: dict[fx.Node, int] = {}

    def on_node(self, node: fx.Node, args: Sequence[Any], result: Any, released: Sequence[fx.Node]) -> None:
        if node.op == "call_function":
            macs = node_macs(node, args, result)
            if macs:
                self.macs[node] = macs


def macs_per_node(module: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[fx.Node, int]:
    counter = MacCounter()
    run_with_hooks(module, inputs, [counter])
    return counter.macs


@dataclass
class LinearLayer:
    node: str
    module: str
    op: str
    weight_shape: tuple[int, ...]
    macs: int


@dataclass
class GraphSummary:
    op_counts: Counter
    total_macs: int
    linear_layers: list[LinearLayer]
    blocks: dict[str, list[str]] = field(default_factory=dict)  # container -> block module names


def summarize(module: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> GraphSummary:
    macs = macs_per_node(module, inputs)
    ops = Counter(op_type(n) for n in module.graph.nodes if n.op == "call_function")
    layers = [
        LinearLayer(
            n.name, module_path(n) or module_class(n), op_type(n), tuple(n.args[1].meta["val"].shape), macs.get(n, 0)
        )
        for n in module.graph.nodes
        if n.op == "call_function" and n.target in LINEAR_OPS
    ]
    return GraphSummary(ops, sum(macs.values()), layers, find_blocks(module.graph))


def variant_macs(program, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """MACs of one call of each variant of a step program at the inputs' batch size."""
    state = program.state.allocate(inputs[0].shape[0], inputs[0].device)
    return {name: sum(macs_per_node(module, (*inputs, *state)).values()) for name, module in program.variants.items()}


def macs_per_run(
    program, inputs: Sequence[torch.Tensor], num_steps: int | None = None, variants_run: Sequence[str] | None = None
) -> int:
    """MACs of a whole sampling run: each step's variant (and probe, where the schedule has
    one), as the schedule picks it for ``num_steps`` steps, or as a run used them
    (``variants_run``, e.g. ``SamplingStats.variants``; needed where a probe decides)."""
    if (num_steps is None) == (variants_run is None):
        raise ValueError("pass exactly one of num_steps= (schedules without a probe) or variants_run=")
    schedule = program.schedule
    if variants_run is None:
        if schedule.probes:
            raise ValueError(
                "a probe picks variants at run time: pass variants_run=stats.variants "
                "from a sampling run instead of num_steps="
            )
        variants_run = [schedule.variant_at(k) for k in range(num_steps)]
    per_variant = variant_macs(program, inputs)
    probes = [schedule.probe_at(k) for k in range(len(variants_run))]
    return sum(
        per_variant[name] + (per_variant[probe] if probe is not None else 0)
        for name, probe in zip(variants_run, probes)
    )


class count_macs:
    """Context manager: multiply-accumulates of every matmul, convolution and attention
    that runs inside it, whatever runs it (fx graphs, eager modules, hooks patched in
    Python): torch's ``FlopCounterMode`` / 2, with CPU attention counted as well
    (torch only counts the CUDA attention kernels). ``.macs`` holds the total."""

    def __enter__(self) -> count_macs:
        from torch.utils.flop_counter import FlopCounterMode

        _register_cpu_attention_flops()
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._mode.__exit__(*exc_info)
        self.macs = self._mode.get_total_flops() // 2


def _register_cpu_attention_flops() -> None:
    from torch.utils import flop_counter

    cpu_attention = aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_attention in flop_counter.flop_registry:
        return

    def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    flop_counter.register_flop_formula(cpu_attention)(attention_flops)
