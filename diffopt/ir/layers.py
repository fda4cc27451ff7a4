"""Layers and blocks of a captured graph, and the one scheme that names them.

A layer is a linear op (``aten.linear``, ``aten.conv1d/2d``) of the model; its name is
the module path it came from (``transformer_blocks.0.attn1.to_q``), made unique per
call in graph order (a module called twice gets ``#2`` on its second call). Blocks are
the outermost indexed children of the model (``transformer_blocks.3``,
``down_blocks.1``) plus a top-level ``mid_block``. Calibration statistics, the layer
policy, annotations and reports all use these names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import fx

from diffopt.ir.graph_tools import module_path, module_scopes

aten = torch.ops.aten
LINEAR_OPS = (aten.linear.default, aten.conv1d.default, aten.conv2d.default)
ATTENTION = aten.scaled_dot_product_attention.default
ATTENTION_OPERANDS = ("query", "key", "value")
INDEXED_CHILD = re.compile(r"^(?P<container>.+)\.(?P<index>\d+)$")


def layer_key(node: fx.Node) -> str:
    """Statistics are keyed by the layer's module name (its node name if it has none)."""
    return module_path(node) or node.name


def unique_layer_keys(graph: fx.Graph, nodes: list[fx.Node]) -> dict[fx.Node, str]:
    """``layer_key`` of each of ``nodes``, made unique in graph order: a module called twice
    gets ``#2`` on its second call (DiT's block-0 embedder also conditions the output layer)."""
    keys, seen = {}, {}
    for node in nodes:
        key = layer_key(node)
        seen[key] = seen.get(key, 0) + 1
        keys[node] = key if seen[key] == 1 else f"{key}#{seen[key]}"
    return keys


def layer_names(graph: fx.Graph) -> dict[fx.Node, str]:
    """Every linear op and attention product of ``graph`` with its unique layer name."""
    ops = [n for n in graph.nodes if n.op == "call_function" and (n.target in LINEAR_OPS or n.target == ATTENTION)]
    return unique_layer_keys(graph, ops)


def linear_layers(graph: fx.Graph) -> dict[fx.Node, str]:
    """The model's linear / conv layers (nodes captured from a module whose weight is a graph
    attribute; ops a pass inserted have no module) with their layer names (``layer_names``)."""
    return {
        node: name
        for node, name in layer_names(graph).items()
        if node.target in LINEAR_OPS
        and getattr(node.args[1], "op", None) == "get_attr"
        and node.meta.get("nn_module_stack")
    }


def op_name(node: fx.Node) -> str:
    return node.target.overloadpacket.__name__


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


def module_chains(model: torch.nn.Module) -> dict[str, list[str]]:
    """The chains of blocks ``find_blocks`` would find, read from the module tree instead of a
    graph (before any capture): the outermost indexed children that are not single layers,
    plus a top-level ``mid_block``."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        match = INDEXED_CHILD.match(name)
        if match and any(True for _ in module.children()) and not any(INDEXED_CHILD.match(p) for p in _ancestors(name)):
            found.setdefault(match["container"], []).append(name)
    if isinstance(getattr(model, "mid_block", None), torch.nn.Module):
        found["mid_block"] = ["mid_block"]
    return found


def choose_chain(found: dict[str, list[str]], container: str | tuple[str, ...] | None, owner: str) -> list[str]:
    """The blocks of the chain(s) ``container`` names in ``found`` (``find_blocks`` or
    ``module_chains``), joined in the given order; ``None``: the only chain of two or more
    blocks. A ``ValueError`` naming ``owner`` lists the chains where the choice fails, and
    points UNets (down and up blocks: not one residual chain) to ``BlockCachePass``."""
    is_unet = "down_blocks" in found and "up_blocks" in found
    unet_hint = (
        f" {owner} walks one chain of residual blocks; a UNet's down_blocks and up_blocks are not one: use "
        f"BlockCachePass() (every block) or BlockCachePass(blocks=('up_blocks.1',)) (DeepCache) instead"
    )
    if container is None:
        chains = {name: blocks for name, blocks in found.items() if len(blocks) >= 2}
        if len(chains) != 1:
            lengths = {name: len(blocks) for name, blocks in found.items()}
            raise ValueError(
                f"{owner}: found {len(chains)} chains of two or more blocks (blocks per chain: {lengths})."
                + (
                    unet_hint
                    if is_unet
                    else " Name one with container=, or several to join, e.g. "
                    "container=('transformer_blocks', 'single_transformer_blocks')"
                )
            )
        return next(iter(chains.values()))
    names = (container,) if isinstance(container, str) else container
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(
            f"{owner}: no chain of blocks named {missing}; chains: {sorted(found)}" + (unet_hint if is_unet else "")
        )
    return [block for name in names for block in found[name]]


def require_chain(model: torch.nn.Module, container: str | tuple[str, ...] | None, owner: str) -> None:
    """Refuse (``ValueError`` naming ``owner``) a ``container`` that names no chain of
    ``model``'s module tree (``choose_chain`` on ``module_chains``): a pass's check before capture."""
    choose_chain(module_chains(model), container, owner)


def require_blocks(model: torch.nn.Module, blocks: Sequence[str] | None, owner: str) -> None:
    """Refuse (``ValueError`` naming ``owner``) ``blocks`` that are not blocks of ``model``."""
    if blocks is None:
        return
    known = {block for members in module_chains(model).values() for block in members}
    missing = sorted(set(blocks) - known)
    if missing:
        raise ValueError(f"{owner}: blocks {missing} are not in {type(model).__name__}; its blocks are {sorted(known)}")
