"""Read-only analysis of a captured graph: op counts, MACs per call, linear layers, blocks.

MACs are counted by running the graph once on concrete inputs (an fx Interpreter that
sees every node's real input and output shapes): linear = out.numel() * in_features,
conv = out.numel() * in_channels/groups * kernel area, matmul-like = out.numel() * K,
attention = batch * heads * L * S * (E_qk + E_v).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx

from diffopt.graph_tools import module_class, module_path, module_scopes, op_type

aten = torch.ops.aten
LINEAR_OPS = (aten.linear.default, aten.conv1d.default, aten.conv2d.default)
INDEXED_CHILD = re.compile(r"^(?P<container>.+)\.(?P<index>\d+)$")


def node_macs(node: fx.Node, args: Sequence[Any], out: Any) -> int:
    """Multiply-accumulates one aten node performs, given its concrete arguments and result."""
    target = node.target
    if target == aten.linear.default:
        return out.numel() * args[1].shape[1]
    if target in (aten.conv1d.default, aten.conv2d.default):
        weight = args[1]
        return out.numel() * weight[0].numel()
    if target in (aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default,
                  aten.baddbmm.default):
        first = args[1] if target in (aten.addmm.default, aten.baddbmm.default) else args[0]
        return out.numel() * first.shape[-1]
    if target == aten.scaled_dot_product_attention.default:
        q, k, v = args[:3]
        batch_heads = q.numel() // (q.shape[-2] * q.shape[-1])
        return batch_heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


class _MacCounter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.macs: dict[fx.Node, int] = {}

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if node.op == "call_function":
            args, _ = self.fetch_args_kwargs_from_env(node)
            macs = node_macs(node, args, result)
            if macs:
                self.macs[node] = macs
        return result


def macs_per_node(module: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> dict[fx.Node, int]:
    counter = _MacCounter(module)
    with torch.no_grad():
        counter.run(*inputs)
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


def find_blocks(graph: fx.Graph) -> dict[str, list[str]]:
    """Repeated blocks: the outermost indexed children (``transformer_blocks.3``,
    ``down_blocks.1``) in the nodes' module stacks, plus top-level ``mid_block``."""
    found: dict[str, list[str]] = {}
    for node in graph.nodes:
        scopes = module_scopes(node)
        for depth, name in enumerate(scopes):
            match = INDEXED_CHILD.match(name)
            is_leaf = depth == len(scopes) - 1  # a single layer (e.g. Sequential's Linear) is not a block
            if match and not is_leaf and not any(INDEXED_CHILD.match(p) for p in _ancestors(name)):
                found.setdefault(match["container"], [])
                if name not in found[match["container"]]:
                    found[match["container"]].append(name)
                break
            if name == "mid_block":
                found.setdefault("mid_block", ["mid_block"])
                break
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def summarize(module: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> GraphSummary:
    macs = macs_per_node(module, inputs)
    ops = Counter(op_type(n) for n in module.graph.nodes if n.op == "call_function")
    layers = [
        LinearLayer(n.name, module_path(n) or module_class(n), op_type(n),
                    tuple(n.args[1].meta["val"].shape), macs.get(n, 0))
        for n in module.graph.nodes if n.op == "call_function" and n.target in LINEAR_OPS
    ]
    return GraphSummary(ops, sum(macs.values()), layers, find_blocks(module.graph))


def variant_macs(program, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """MACs of one call of each variant of a step program at the inputs' batch size."""
    state = program.state.allocate(inputs[0].shape[0], inputs[0].device)
    return {name: sum(macs_per_node(module, (*inputs, *state)).values())
            for name, module in program.variants.items()}


def macs_per_run(program, inputs: Sequence[torch.Tensor], num_steps: int | None = None,
                 variants_run: Sequence[str] | None = None) -> int:
    """MACs of a whole sampling run: each step's variant, as a periodic schedule picks it
    for ``num_steps`` steps, or as a run used them (``variants_run``, e.g.
    ``SamplingStats.variants``; needed for an ``AdaptiveSchedule``, whose probe runs every step)."""
    if (num_steps is None) == (variants_run is None):
        raise ValueError("pass exactly one of num_steps= (periodic schedules) or variants_run=")
    per_variant = variant_macs(program, inputs)
    probe = getattr(program.schedule, "probe", None)
    if variants_run is None:
        if probe is not None:
            raise ValueError("an adaptive schedule picks variants at run time: pass variants_run=stats.variants "
                             "from a sampling run instead of num_steps=")
        variants_run = [program.schedule.variant_at(k) for k in range(num_steps)]
    return sum(per_variant[name] + (per_variant[probe] if probe else 0) for name in variants_run)


class count_macs:
    """Context manager: multiply-accumulates of every matmul, convolution and attention
    that runs inside it, whatever runs it (fx graphs, eager modules, hooks patched in
    Python): torch's ``FlopCounterMode`` / 2, with CPU attention counted as well
    (torch only counts the CUDA attention kernels). ``.macs`` holds the total."""

    def __enter__(self) -> "count_macs":
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
