"""Capture: an ``nn.Module`` denoiser -> one aten-level ``torch.fx`` graph + its signature.

The model is wrapped so that its inputs become ``(latent, timestep, *conditions)`` in
that canonical order and its output (tensor, tuple, dict or dataclass) becomes one
tensor, then exported with ``torch.export.export(strict=False)`` with a dynamic batch
dimension. The result is a plain ``GraphModule`` (no pytree codegen) whose
placeholders are named after the model's own arguments and whose nodes keep
``nn_module_stack`` metadata for block and layer discovery.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from diffopt.ir.signature import WRAPPED_MODEL_ATTRIBUTE, CapturedGraph, Signature, first_tensor_output

LATENT_NAMES = ("hidden_states", "sample", "x", "x_t", "latent", "latents")
TIMESTEP_NAMES = ("timestep", "timesteps", "t")


class CaptureError(RuntimeError):
    """The model could not be captured; the message says where and what to do."""


@dataclass(frozen=True)
class CallPlan:
    """How ``model.forward`` is called from named values: ``positional`` names (parameters,
    then the ``*args`` items, named ``args[0]``...), ``keywords`` (name -> value name),
    ``dicts`` (a dict argument -> its keys; value ``arg.key`` is entry ``key``) and
    ``sequences`` (a tuple/list argument of tensors -> its length; value ``arg[i]`` is item i)."""

    positional: tuple[str, ...]
    keywords: tuple[str, ...]
    dicts: Mapping[str, tuple[str, ...]]
    sequences: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def call(self, model: torch.nn.Module, values: Mapping[str, Any]) -> Any:
        def value(name: str) -> Any:
            if name in self.dicts:
                return {key: values[f"{name}.{key}"] for key in self.dicts[name]}
            if name in self.sequences:
                return tuple(values[f"{name}[{i}]"] for i in range(self.sequences[name]))
            return values[name]

        return model(*(value(n) for n in self.positional), **{n: value(n) for n in self.keywords})


def is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def is_tensor_sequence(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def flatten_argument(name: str, value: Any) -> dict[str, Any]:
    """One argument as capture names its values: the entries of a dict holding tensors become
    ``name.key`` (PixArt's ``added_cond_kwargs.resolution``), the items of a tuple or list of
    tensors ``name[i]`` (ControlNet's ``down_block_additional_residuals``), anything else
    stays ``name``."""
    if is_tensor_dict(value):
        return {f"{name}.{key}": item for key, item in value.items()}
    if is_tensor_sequence(value):
        return {f"{name}[{i}]": item for i, item in enumerate(value)}
    return {name: value}


class CanonicalDenoiser(torch.nn.Module):
    """``forward(latent, timestep, *conditions) -> tensor`` around any denoiser."""

    def __init__(self, model: torch.nn.Module, signature: Signature, static: Mapping[str, Any], plan: CallPlan):
        super().__init__()
        setattr(self, WRAPPED_MODEL_ATTRIBUTE, model)
        self.signature, self.static, self.plan = signature, dict(static), plan

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        values = {**self.static, **dict(zip(self.signature.input_names, inputs))}
        return first_tensor_output(self.plan.call(getattr(self, WRAPPED_MODEL_ATTRIBUTE), values))


def _bind_example_inputs(
    model: torch.nn.Module, example_inputs: Sequence[Any] | Mapping[str, Any]
) -> tuple[dict[str, Any], CallPlan]:
    """Name every example input (``*args`` items ``args[i]``, dict entries ``arg.key``) and
    plan the call that passes them back the way ``forward`` takes them."""
    parameters = inspect.signature(model.forward).parameters
    positional_names = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = next((n for n, p in parameters.items() if p.kind == p.VAR_POSITIONAL), None)
    if isinstance(example_inputs, Mapping):
        named, extra = dict(example_inputs), []
    else:
        named = dict(zip(positional_names, example_inputs))
        extra = list(example_inputs[len(positional_names) :])
        if extra and varargs is None:
            raise CaptureError(
                f"{type(model).__name__}.forward takes {len(positional_names)} positional inputs "
                f"{positional_names}, but {len(example_inputs)} example inputs were given"
            )
    if "return_dict" in parameters and "return_dict" not in named:
        named["return_dict"] = False
    var_names = [f"{varargs}[{i}]" for i in range(len(extra))]
    given = 0 if isinstance(example_inputs, Mapping) else len(example_inputs) - len(extra)
    positional = positional_names[:given] + var_names  # a dict of inputs is passed by keyword
    keywords = [n for n in named if n not in positional]
    bound, dicts, sequences = {}, {}, {}
    for name, value in [*named.items(), *zip(var_names, extra)]:
        entries = flatten_argument(name, value)
        if is_tensor_dict(value):
            dicts[name] = tuple(value)
        elif is_tensor_sequence(value):
            sequences[name] = len(value)
        bound.update(entries)
        if any(map(_holds_nested_tensors, entries.values())):
            raise CaptureError(
                f"input {name!r} holds tensors nested more than one level deep: capture would bake them in as "
                f"constants. Pass them as separate arguments, a flat dict of tensors or a flat tuple of tensors."
            )
    return bound, CallPlan(tuple(positional), tuple(keywords), dicts, sequences)


def _holds_nested_tensors(value: Any) -> bool:
    """Whether ``value`` is a container (list, tuple, dict) with a tensor somewhere inside."""
    if isinstance(value, Mapping):
        value = list(value.values())
    if not isinstance(value, (list, tuple)):
        return False
    return any(isinstance(item, torch.Tensor) or _holds_nested_tensors(item) for item in value)


def infer_signature(bound: Mapping[str, Any], latent: str | None = None, timestep: str | None = None) -> Signature:
    """Pick the latent and timestep inputs by name; every other tensor input is a condition."""
    tensor_names = [n for n, v in bound.items() if isinstance(v, torch.Tensor)]

    def pick(explicit: str | None, candidates: tuple[str, ...], role: str) -> str:
        if explicit is not None:
            if explicit not in tensor_names:
                raise CaptureError(f"{role} input {explicit!r} is not among the tensor inputs {tensor_names}")
            return explicit
        for name in candidates:
            if name in tensor_names:
                return name
        raise CaptureError(
            f"could not tell which input is the {role}: tensor inputs are {tensor_names}; "
            f"pass {role}=<name> to capture()"
        )

    latent_name = pick(latent, LATENT_NAMES, "latent")
    timestep_name = pick(timestep, TIMESTEP_NAMES, "timestep")
    conditions = tuple(n for n in tensor_names if n not in (latent_name, timestep_name))
    return Signature(latent_name, timestep_name, conditions)


def _failure_location(error: BaseException) -> str:
    """The innermost traceback frame outside torch: where the model's code made export fail."""
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if "/torch/" not in f.filename and not f.filename.endswith("diffopt/capture.py")
    ]
    if not frames:
        return "inside torch.export"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} ({frame.name}: {frame.line})"


_EXPORT_ASSERTIONS = (torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default)


def _is_noop_squeeze(node: fx.Node) -> bool:
    if node.target not in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims):
        return False
    shape = node.args[0].meta["val"].shape
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    return all(isinstance(shape[d], int) and shape[d] != 1 for d in dims)


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _inferred_static_dim(node: fx.Node) -> int | None:
    """The position of a ``-1`` in a view's sizes whose result there is a plain int, if any."""
    sizes, value = node.args[1], node.meta.get("val")
    if not isinstance(sizes, (list, tuple)) or -1 not in sizes or not isinstance(value, torch.Tensor):
        return None
    position = list(sizes).index(-1)
    return position if type(value.shape[position]) is int else None


def _plain_graph_module(exported: torch.export.ExportedProgram, signature: Signature) -> fx.GraphModule:
    """Unlift an ExportedProgram into a GraphModule with plain positional placeholders and a
    tuple output, without export's guard and metadata assertions, inference-mode dropout
    and squeezes of dimensions that are not 1 (all identities)."""
    unlifted = exported.module()
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    old_placeholders = [n for n in unlifted.graph.nodes if n.op == "placeholder"]
    for old, name in zip(old_placeholders, signature.input_names, strict=True):
        new = graph.placeholder(re.sub(r"\W", "_", name))  # "added_cond_kwargs.resolution": an identifier
        new.meta = dict(old.meta)
        value_map[old] = new
    outputs = graph.graph_copy(unlifted.graph, value_map)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    graph.output(tuple(outputs))
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or node.target in _EXPORT_ASSERTIONS:
            graph.erase_node(node)  # diffopt checks inputs itself; assertions would keep cut-off work alive
        elif node.target in _VIEWS and _inferred_static_dim(node) is not None:
            # view(mask, [batch, heads, -1, tokens]) with a dynamic batch infers -1 as a quotient of symbols
            # that later tracing (the ONNX exporter's) cannot prove to be 1: write the size capture saw
            sizes = list(node.args[1])
            sizes[_inferred_static_dim(node)] = int(node.meta["val"].shape[_inferred_static_dim(node)])
            node.args = (node.args[0], sizes, *node.args[2:])
        elif (node.target == torch.ops.aten.dropout.default and node.args[2] is False) or _is_noop_squeeze(node):
            # inference dropout is the identity, but dead-code elimination keeps it (it is "random"), and
            # with it everything it reads; a squeeze of non-1 dimensions (PixArt) is the identity in torch
            # but an invalid ONNX Squeeze
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    module = fx.GraphModule(unlifted, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _batch_range(exported: torch.export.ExportedProgram) -> tuple[int, float] | None:
    """The batch sizes export's guards admit, or None when the batch was specialised to a constant."""
    placeholder = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name.startswith("inputs"))
    size = placeholder.meta["val"].shape[0]
    if not isinstance(size, torch.SymInt):
        return None
    bounds = exported.range_constraints.get(size.node.expr)  # absent: export proved the size a constant
    return None if bounds is None else (int(bounds.lower), float(bounds.upper))


def _check_batch_generalises(
    exported, wrapper: torch.nn.Module, module: fx.GraphModule, inputs: Sequence[torch.Tensor], batched: set[int]
) -> None:
    """Make sure the graph is right for every batch size, not just the guarded range.

    Export records guards such as ``batch <= 63`` when model code branches on the batch
    size (diffusers' Upsample2D calls ``.contiguous()`` from batch 64 on). diffopt runs
    graphs without those guards, so the graph is checked against the eager model at
    batch 1 and just past the guarded range; a mismatch means the branch changes the
    result, and capture refuses rather than silently computing something else.
    """
    bounds = _batch_range(exported)
    if bounds is None:
        raise CaptureError(
            f"the batch size of {type(wrapper.model).__name__} was specialised to a constant during "
            f"export (the model uses it as a Python int somewhere). Capture with "
            f"dynamic_batch=False, or make that code use tensor shapes."
        )
    lower, upper = bounds
    probes = {1} | ({int(upper) + 1} if upper != float("inf") else set())
    batch = inputs[0].shape[0]
    for probe in sorted(probes):
        repeated = [v[torch.arange(probe) % batch] if i in batched else v for i, v in enumerate(inputs)]
        with torch.no_grad():
            expected, got = wrapper(*repeated), module(*repeated)[0]
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise CaptureError(
                f"{type(wrapper.model).__name__} computes differently at batch size {probe}: export "
                f"guarded the batch to [{lower}, {upper}] and the graph does not generalise. Capture "
                f"with dynamic_batch=False at the batch size you will run."
            )


def _changed(value: torch.Tensor) -> torch.Tensor:
    """Another valid-looking value of an input: floats scaled and shifted, integers + 1."""
    if value.is_floating_point():
        return value * 1.25 + 0.5
    return value + 1 if value.dtype != torch.bool else ~value


def _check_inputs_stay_live(wrapper: torch.nn.Module, module: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Export may bake an input's example value into the graph (model code that reads it
    as a Python number): then the graph ignores later values. Each input but the latent is
    changed once; the graph must follow the eager model, or capture names the input."""
    for index, name in enumerate(wrapper.signature.input_names[1:], start=1):
        changed = list(inputs)
        changed[index] = _changed(inputs[index])
        try:
            with torch.no_grad():
                expected = wrapper(*changed)
        except Exception:  # noqa: BLE001 - the changed value is not valid for this model (an index): no check
            continue
        with torch.no_grad():
            got = module(*changed)[0]
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise CaptureError(
                f"capture specialised input {name!r} of {type(wrapper.model).__name__} to its example value: "
                f"the graph ignores other values (the model reads it as a Python number). Make that code use "
                f"tensor operations, or pass {name!r} as a constant if it never changes."
            )


def _export(
    wrapper: CanonicalDenoiser,
    signature: Signature,
    inputs: Sequence[torch.Tensor],
    batched: set[int],
    dynamic_batch: bool,
) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """(graph, the inputs it was exported at) of ``wrapper`` with the inputs at ``batched``
    positions dynamic along their first dimension (at batch 1 they are exported at batch 2,
    since export specialises a size-1 dimension), checked to generalise over the batch."""
    inputs = list(inputs)
    if dynamic_batch and inputs[0].shape[0] == 1:
        inputs = [v.expand(2, *v.shape[1:]).contiguous() if i in batched else v for i, v in enumerate(inputs)]
    dynamic_shapes = None
    if dynamic_batch:  # one entry: the wrapper's ``*inputs`` varargs, itself a tuple of per-input specs
        dynamic_shapes = (tuple({0: torch.export.Dim.AUTO} if i in batched else None for i in range(len(inputs))),)
    with torch.no_grad():
        exported = torch.export.export(wrapper, tuple(inputs), dynamic_shapes=dynamic_shapes, strict=False)
    module = _plain_graph_module(exported, signature)
    if dynamic_batch:
        _check_batch_generalises(exported, wrapper, module, inputs, batched)
    return module, inputs


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    *,
    latent: str | None = None,
    timestep: str | None = None,
    dynamic_batch: bool = True,
) -> CapturedGraph:
    """Capture ``model`` as an aten-level graph ``(latent, timestep, *conditions) -> (out,)``.

    ``example_inputs`` are positional (in ``model.forward`` order, ``*args`` included) or a
    dict of keyword inputs. Tensor inputs become graph inputs, and so do the tensors inside
    dict arguments (named ``arg.key``, e.g. ``added_cond_kwargs.resolution``); everything
    else (``None``, flags, options) is baked in as a constant. Dict/dataclass outputs become
    one tensor. With ``dynamic_batch`` the graph accepts any batch size (example inputs of
    batch 1 are exported at batch 2 and checked at 1). An input whose value export baked
    in (the graph ignores a changed value) is a ``CaptureError`` naming it.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected an nn.Module denoiser, found {type(model).__name__}")
    bound, plan = _bind_example_inputs(model, example_inputs)
    signature = infer_signature(bound, latent, timestep)
    inputs = [bound[n] for n in signature.input_names]
    batch = inputs[0].shape[0]
    if inputs[1].dim() == 0:
        inputs[1] = inputs[1].expand(batch).contiguous()
    static = {n: v for n, v in bound.items() if n not in signature.input_names}
    wrapper = CanonicalDenoiser(model, signature, static, plan).eval()
    batched = {i for i, v in enumerate(inputs) if v.dim() > 0 and v.shape[0] == batch} if dynamic_batch else set()
    # a condition whose first size equals the batch by chance (Flux/Chroma's img_ids of one token at batch 1) is
    # not batched: when export fails with every such input batched, each is tried unbatched, then all of them
    suspects = sorted(i for i in batched if i >= 2)
    attempts = [batched, *(batched - {i} for i in suspects)] + ([batched - set(suspects)] if len(suspects) > 1 else [])
    first_error = None
    for attempt in attempts:
        try:
            module, inputs_used = _export(wrapper, signature, inputs, attempt, dynamic_batch)
            break
        except Exception as error:  # torch.export raises many exception types; all mean "not capturable"
            first_error = first_error or error
    else:
        if isinstance(first_error, CaptureError):
            raise first_error
        summary = str(first_error).strip().splitlines()[0] if str(first_error).strip() else type(first_error).__name__
        raise CaptureError(
            f"could not capture {type(model).__module__}.{type(model).__name__}: torch.export failed "
            f"at {_failure_location(first_error)}: {type(first_error).__name__}: {summary}. What you can do: "
            f"make that code traceable (no data-dependent Python control flow on tensor values), "
            f"or pass the offending option as a constant."
        ) from first_error
    inputs = inputs_used
    _check_inputs_stay_live(wrapper, module, inputs)
    return CapturedGraph(module, signature, f"{type(model).__module__}.{type(model).__name__}")
