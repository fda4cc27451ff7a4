"""Export a step program to ONNX: one graph per variant, weights stored once, a manifest.

Before: an ``OptimizedDenoiser`` (fx graphs run by torch). After: a bundle directory with
``<variant>.onnx`` per variant, each ``(latent, timestep, *conditions, *state) ->
(out, *next_state)`` (a probe returns its signal first) with a dynamic batch axis; every
weight that several variants share lives once in ``weights.bin`` (ONNX external data);
``manifest.json`` describes the rest (``diffopt.export.manifest``), including every
quantization step. Every file passes the full ``onnx.checker``. Quantize / dequantize
custom ops become ONNX Q/DQ operators (``diffopt.quantized_ops.ONNX_TRANSLATIONS``);
programs that compute in float64 (exact integer emulation) are refused. Intermediate
``value_info`` is dropped (onnxruntime's quantization tools fail on stale shapes).

Profiles: ``"onnxruntime"``, and ``"tensorrt"``, which also checks that each graph uses
only operators on TensorRT's ONNX parser list (``tensorrt_onnx_ops.txt``) and that no
state output aliases an input. Building TensorRT engines needs an NVIDIA GPU and is not
done here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from diffopt.export.precision import check_precision, quantize_variant, require_static_quantization
from diffopt.ir.graph_tools import attribute
from diffopt.ir.program import StepProgram
from diffopt.ir.specs import BATCH, TensorSpec, concrete_shape
from diffopt.quant.ops import ONNX_TRANSLATIONS, quantization_summary
from diffopt.runtime.bundle import PROFILES, Manifest, VariantFile, sha256_of
from diffopt.runtime.bundle_writing import ExportError, write_bundle
from diffopt.runtime.denoiser import OptimizedDenoiser
from diffopt.version import __version__

aten = torch.ops.aten
_NARROW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

EXPORTER_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"
WEIGHTS_FILE = "weights.bin"
INLINE_LIMIT = 1024  # bytes: smaller tensors stay inside the graph files
ALIGNMENT = 64


def to_onnx(
    optimized: OptimizedDenoiser | StepProgram,
    directory: str | Path,
    *,
    profile: str = "onnxruntime",
    export_batch: int = 2,
    scheduler_config: Mapping[str, Any] | None = None,
    call: Mapping[str, Any] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    precision: str = "fp32",
) -> Manifest:
    """Write the bundle for ``optimized`` into ``directory`` and return its manifest.

    The bundle is written and verified (loaded with its checksums, and step 0 run on
    onnxruntime) in the transaction of ``runtime.bundle_writing.write_bundle``: a bundle
    already in ``directory`` is never removed before its replacement is complete, and a
    refused, failed or killed export leaves it as it was; ``directory`` must be missing,
    empty or hold a bundle and nothing else. ``scheduler_config`` (the model's ``make_scheduler``
    config) travels in the manifest so the bundle can be sampled without the model's code;
    ``call`` (``pipelines.bundles.call_record``) records the pipeline call it was captured at.
    ``example_inputs`` (latent, timestep, *conditions: a real call's, e.g. the captured one's)
    are what the verification runs step 0 on; without them it runs on random floats and ones
    for integer and boolean inputs (a mask of zeros would hide every token). ``precision``
    (``fp32``, ``bf16``, ``int8-dynamic``, ``int8-static``) is what the variants compute in
    (``export.precision``); the manifest records it."""
    program = optimized.program if isinstance(optimized, OptimizedDenoiser) else optimized
    if profile not in PROFILES:
        raise ValueError(f"unknown export profile {profile!r}: expected one of {PROFILES}")
    if not isinstance(program, StepProgram):
        raise TypeError(
            f"to_onnx exports a StepProgram (or an OptimizedDenoiser running one), found "
            f"{type(program).__name__}: a denoiser loaded from a bundle has no graphs; export the "
            f"optimized model instead"
        )
    if isinstance(export_batch, bool) or not isinstance(export_batch, int) or export_batch < 1:
        raise ValueError(f"export_batch must be an int >= 1, found {export_batch!r}")
    check_precision(precision, profile)
    if scheduler_config is not None and not isinstance(scheduler_config, Mapping):
        raise TypeError(f"scheduler_config must be a mapping (make_scheduler's config), found {scheduler_config!r}")
    require_static_quantization(precision, quantization_summary({n: m.graph for n, m in program.variants.items()}))
    program = _float64_tables_in_float32(program)
    _require_no_float64(program)
    return write_bundle(
        directory,
        lambda staging: _write_bundle(program, staging, profile, export_batch, scheduler_config, call, precision),
        lambda staging: _verify(staging, export_batch, example_inputs),
    )


def _write_bundle(
    program: StepProgram,
    directory: Path,
    profile: str,
    export_batch: int,
    scheduler_config: Mapping | None,
    call: Mapping | None,
    precision: str,
) -> Manifest:
    import onnx

    input_specs = _input_specs(program)
    example = [torch.zeros(concrete_shape(spec.shape, export_batch), dtype=spec.torch_dtype) for spec in input_specs]
    probes = program.schedule.probes
    models, variant_files = {}, {}
    for name in tqdm(program.variants, desc="exporting variants", leave=False):
        output_names = ["signal" if name in probes else "out", *(f"next.{n}" for n in program.state.names)]
        models[name] = _export_variant(program.variants[name], example, input_specs, output_names, name)
    _store_weights_once(models, directory / WEIGHTS_FILE)
    quantization = quantization_summary({name: module.graph for name, module in program.variants.items()})
    for name, model in tqdm(models.items(), desc=f"writing variants ({precision})", leave=False):
        model.graph.ClearField("value_info")  # stale intermediate shapes break onnxruntime.quantization's tools
        path = directory / f"{name}.onnx"
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        if profile == "tensorrt":
            check_tensorrt_ready(model, name)
        if precision == "int8-dynamic":
            quantization[name] = [*quantization.get(name, []), *quantize_variant(path)]
        variant_files[name] = VariantFile(path.name, tuple(input_specs), _output_specs(model), sha256_of(path))
    manifest = Manifest(
        program.signature,
        program.state,
        program.schedule,
        variant_files,
        profile,
        WEIGHTS_FILE,
        sha256_of(directory / WEIGHTS_FILE),
        __version__,
        program.model_class,
        _opset(next(iter(models.values()))),
        quantization,
        scheduler=dict(scheduler_config) if scheduler_config is not None else None,
        call=dict(call) if call is not None else None,
        precision=precision,
    )
    manifest.save(directory)
    return manifest


def _verify(directory: Path, batch_size: int, example_inputs: Sequence[torch.Tensor] | None) -> None:
    """Load the bundle as a user would (checksums included) and run its step 0, on
    ``example_inputs`` (repeated to ``batch_size``) or on made-up inputs."""
    from diffopt.runtime.runtimes import load_bundle

    bundle = load_bundle(directory, threads=1)
    specs = bundle.program.inputs
    if example_inputs is not None:
        if len(example_inputs) != len(specs):
            raise ExportError(
                f"example_inputs: expected {len(specs)} tensors {[s.name for s in specs]}, found {len(example_inputs)}"
            )
        inputs = [_repeated(value, spec, batch_size) for value, spec in zip(example_inputs, specs)]
        made = "the example inputs"
    else:
        generator = torch.Generator().manual_seed(0)
        inputs = [
            torch.randn(concrete_shape(s.shape, batch_size), generator=generator).to(s.torch_dtype)
            if s.torch_dtype.is_floating_point
            else torch.ones(concrete_shape(s.shape, batch_size), dtype=s.torch_dtype)
            for s in specs
        ]
        made = "random inputs (floats normal, integers and booleans 1)"
    out, _ = bundle.step(0, *inputs, state=bundle.init_state(batch_size))
    if not torch.isfinite(out).all():
        names = ", ".join(s.name for s in specs)
        raise ExportError(
            f"the exported bundle's step 0 gives non-finite values on {made} ({names}) in {directory}: "
            + (
                "pass example_inputs= (a real call's inputs) so verification runs on values the model accepts"
                if example_inputs is None
                else "the program itself computes NaN or inf on these inputs; check it in torch first"
            )
        )


def _repeated(value: torch.Tensor, spec: TensorSpec, batch_size: int) -> torch.Tensor:
    """An example input (any batch) as ``spec`` takes it at ``batch_size``."""
    value = torch.as_tensor(value).to("cpu", spec.torch_dtype)
    if BATCH in spec.shape and value.dim() > 0:
        value = value[torch.arange(batch_size) % value.shape[0]]
    return value


def _node_dtype(node: torch.fx.Node) -> torch.dtype | None:
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else None


def _narrows(node: torch.fx.Node) -> bool:
    """Whether ``node`` casts to float32 or a narrower float."""
    return node.target in (aten.to.dtype, aten._to_copy.default) and _node_dtype(node) in _NARROW_FLOATS


def _float64_tables_in_float32(program: StepProgram) -> StepProgram:
    """``program``, or a copy in which float64 computations that read no input or weight and
    whose every result is cast down to float32 or narrower (diffusers' Flux computes its RoPE
    tables in float64) compute in float32. Other float64 work (integer emulation) is left
    as it is, for ``_require_no_float64`` to refuse. The copy is what exports; the torch
    program keeps float64 (tested: the exported Flux stays within 1e-5 of it)."""
    narrowed = None
    for name, module in program.variants.items():
        wide = [node for node in module.graph.nodes if _node_dtype(node) == torch.float64]
        leaves = [user for node in wide for user in node.users if _node_dtype(user) != torch.float64]
        if not wide or any(n.op in ("placeholder", "get_attr") for n in wide) or not all(map(_narrows, leaves)):
            continue
        narrowed = narrowed or program.copy()
        names = {node.name for node in wide}
        graph = narrowed.variants[name].graph
        for node in graph.nodes:
            if node.name not in names:
                continue
            if node.kwargs.get("dtype") == torch.float64:
                node.kwargs = {**node.kwargs, "dtype": torch.float32}
            node.args = tuple(torch.float32 if arg is torch.float64 else arg for arg in node.args)
            value = node.meta["val"]
            with value.fake_mode:
                node.meta["val"] = value.to(torch.float32)
        narrowed.variants[name].recompile()
    return narrowed or program


def _require_no_float64(program: StepProgram) -> None:
    """Integer emulation (TemporalDifferencePass integer mode, A8W8 static quantization)
    accumulates in float64, which neither onnxruntime's CPU Conv nor TensorRT runs."""
    for name, module in program.variants.items():
        for node in module.graph.nodes:
            value = attribute(module, node.target) if node.op == "get_attr" else node.meta.get("val")
            dtypes = {getattr(value, "dtype", None), node.kwargs.get("dtype")}
            if torch.float64 in dtypes:
                raise ExportError(
                    f"variant {name!r} computes in float64 ({node.name}): the exact integer emulation "
                    f"of integer mode / A8W8 is for verification in torch and does not export; "
                    f"export TemporalDifferencePass mode 'dynamic' (onnxruntime integer kernels) or "
                    f"'difference' (static int8 scales for TensorRT)"
                )


def _input_specs(program: StepProgram) -> list[TensorSpec]:
    """Model inputs from the captured graph's placeholders, state from the state spec."""
    return [*program.inputs, *(entry.spec for entry in program.state.entries)]


def _export_variant(
    module: torch.fx.GraphModule,
    example: Sequence[torch.Tensor],
    input_specs: Sequence[TensorSpec],
    output_names: Sequence[str],
    name: str,
):
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = tuple({0: batch} if spec.shape and spec.shape[0] == BATCH else None for spec in input_specs)
    module.eval()  # the graphs have no train-mode behaviour; this only silences the exporter's warning
    try:
        with warnings.catch_warnings(), _quiet(EXPORTER_REGISTRATION_LOGGER):
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # all inputs share "batch"
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch-internal deprecations
            exported = torch.onnx.export(
                module,
                tuple(example),
                dynamo=True,
                input_names=[s.name for s in input_specs],
                output_names=list(output_names),
                dynamic_shapes=dynamic,
                optimize=True,
                verbose=False,
                custom_translation_table=ONNX_TRANSLATIONS,
            )
    except Exception as error:
        raise ExportError(f"variant {name!r} could not be exported to ONNX: {type(error).__name__}: {error}") from error
    return exported.model_proto


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence ``logger_name`` below errors for a while: the exporter warns, per export, that
    torchvision's ops (which diffopt graphs never hold) cannot be registered without torchvision."""
    exporter_logger = logging.getLogger(logger_name)
    level = exporter_logger.level
    exporter_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        exporter_logger.setLevel(level)


def _output_specs(model) -> tuple[TensorSpec, ...]:
    from onnx import helper

    specs = []
    for value in model.graph.output:
        tensor_type = value.type.tensor_type
        dims = tuple(BATCH if d.dim_param else d.dim_value for d in tensor_type.shape.dim)
        specs.append(TensorSpec(value.name, dims, str(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))))
    return tuple(specs)


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _store_weights_once(models: dict, path: Path) -> None:
    """Move every initializer of at least ``INLINE_LIMIT`` bytes into one external-data file,
    writing identical tensors (same type, shape and bytes) once for all variants."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    stored: dict[tuple, tuple[int, int]] = {}
    with open(path, "wb") as weights:
        for model in models.values():
            for tensor in model.graph.initializer:
                data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                if len(data) < INLINE_LIMIT:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())
                if key not in stored:
                    weights.write(b"\0" * (-weights.tell() % ALIGNMENT))
                    stored[key] = (weights.tell(), len(data))
                    weights.write(data)
                for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(typed)
                tensor.raw_data = data  # set_external_data insists on raw data being present
                offset, length = stored[key]
                external_data_helper.set_external_data(tensor, path.name, offset, length)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL


def tensorrt_supported_ops() -> frozenset[str]:
    text = resources.files("diffopt.export").joinpath("tensorrt_onnx_ops.txt").read_text()
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def check_tensorrt_ready(model, variant: str) -> None:
    """Raise ``ExportError`` unless every operator is on TensorRT's list and no output aliases an input."""
    used = {node.op_type for node in model.graph.node if node.domain in ("", "ai.onnx")}
    custom = sorted(
        {f"{node.domain}::{node.op_type}" for node in model.graph.node if node.domain not in ("", "ai.onnx")}
    )
    unsupported = sorted(used - tensorrt_supported_ops()) + custom
    if unsupported:
        raise ExportError(
            f"variant {variant!r} uses operators TensorRT's ONNX parser does not support: "
            f"{unsupported}; export with profile='onnxruntime' or change the passes that add them"
        )
    aliased = sorted({o.name for o in model.graph.output} & {i.name for i in model.graph.input})
    if aliased:
        raise ExportError(
            f"variant {variant!r} returns its inputs {aliased} unchanged; TensorRT needs distinct state bindings"
        )
