"""Quantized programs on their way out of torch: Q/DQ operators in the ONNX graphs,
onnxruntime's fused integer kernels, TensorRT-ready static scales."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.export import ExportError, to_onnx
from diffopt.measure.calibration import calibrate
from diffopt.models import zoo
from diffopt.passes.temporal_difference import DELTA, TemporalDifferencePass
from diffopt.quant.ops import ONNX_TRANSLATIONS
from diffopt.runtime.runtimes import load_bundle

FUSED_INTEGER_MATMULS = {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
SLOW_OR_WEIGHT_ONLY = {"MatMulInteger", "QLinearMatMul", "MatMulNBits"}  # s8 x s8 paths, float activations


@pytest.fixture(scope="module")
def dit_digits():
    model, config = zoo.load("dit-digits")
    return config, capture(model, zoo.example_inputs("dit-digits"))


BATCH = 8


def _sample(config, runner):
    sampler = Sampler(make_scheduler(config, "ddim", 50), progress=False)
    return sampler.sample(runner, (torch.arange(BATCH) % 10,), shape=(BATCH, 1, 16, 16), seed=1)


@pytest.fixture(scope="module")
def fp32_run(dit_digits):
    config, graph = dit_digits
    return _sample(config, optimize(graph))


def _relative(a, b):
    return float((a - b).norm() / b.norm())


class _Quantizers(torch.nn.Module):
    def forward(self, x):
        return (
            torch.ops.diffopt.fake_quantize(x, 0.0123, 8),
            torch.ops.diffopt.fake_quantize(x, 0.05, 4),
            torch.ops.diffopt.dynamic_fake_quantize(x),
        )


def test_quantizers_give_the_same_values_in_onnxruntime_as_in_torch():
    exported = torch.onnx.export(
        _Quantizers().eval(),
        (torch.randn(2, 400, 8),),
        dynamo=True,
        verbose=False,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        custom_translation_table=ONNX_TRANSLATIONS,
    )
    ops = Counter(node.op_type for node in exported.model_proto.graph.node)
    assert ops["QuantizeLinear"] == 1 and ops["DynamicQuantizeLinear"] == 1 and ops["DequantizeLinear"] == 2
    session = onnxruntime.InferenceSession(exported.model_proto.SerializeToString())
    generator = torch.Generator().manual_seed(0)
    for x in (
        torch.randn(3, 400, 8, generator=generator),
        5 * torch.randn(1, 400, 8, generator=generator),
        torch.rand(2, 400, 8, generator=generator),
        torch.zeros(2, 400, 8),
        -torch.rand(3, 400, 8),
    ):
        expected = _Quantizers()(x)
        actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for a, e in zip(actual, expected):
            assert torch.equal(torch.from_numpy(a), e)
        assert not torch.equal(expected[0], x) or not x.any()  # the inputs really were quantized


def _optimized_onnxruntime_graph(path, tmp_path):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph


def _assert_onnxruntime_runs_the_same_lossy_method(config, fp32, optimized, exported):
    """A quantized mode is not reproduced within float noise: a float-rounding difference
    upstream of a quantizer moves a value across a rounding boundary now and then, and the
    change spreads through later quantizers. What must hold over a 50-step run: onnxruntime
    is closer to the torch run than either is to fp32, with the same error to fp32."""
    torch_run, onnxruntime_run = _sample(config, optimized), _sample(config, exported)
    quantization_error = _relative(torch_run, fp32)
    print(
        f"error to fp32: torch {quantization_error:.2e}, onnxruntime {_relative(onnxruntime_run, fp32):.2e}; "
        f"onnxruntime to torch {_relative(onnxruntime_run, torch_run):.2e}"
    )
    assert 1e-4 < quantization_error < 1e-2
    assert abs(_relative(onnxruntime_run, fp32) - quantization_error) < 0.3 * quantization_error
    assert _relative(onnxruntime_run, torch_run) < quantization_error


def test_dynamic_int8_differences_run_on_onnxruntime_integer_kernels(dit_digits, fp32_run, tmp_path):
    config, graph = dit_digits
    optimized = optimize(graph, [TemporalDifferencePass("dynamic")])
    delta = optimized.program.variants[DELTA].graph
    quantized_matmuls = sum(node.target == torch.ops.diffopt.dequantize_weight.default for node in delta.nodes)
    assert quantized_matmuls == 58  # every linear layer of dit-digits (its one conv, the patch embedding, stays full)
    manifest = to_onnx(optimized, tmp_path / "bundle", export_batch=2)
    steps = manifest.quantization[DELTA]
    assert Counter(s["operand"] for s in steps) == {"weight": 58, "activation": 46}  # q/k/v share one difference
    assert {s["scheme"] for s in steps if s["operand"] == "activation"} == {"dynamic uint8 per tensor"}

    fused = _optimized_onnxruntime_graph(tmp_path / "bundle" / manifest.variants[DELTA].file, tmp_path)
    ops = Counter(node.op_type for node in fused.node)
    assert sum(ops[op] for op in FUSED_INTEGER_MATMULS) == quantized_matmuls, ops
    assert not SLOW_OR_WEIGHT_ONLY & set(ops), ops
    int8_weights = {t.name for t in fused.initializer if t.data_type == onnx.TensorProto.INT8}
    assert not [n for n in fused.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights]

    _assert_onnxruntime_runs_the_same_lossy_method(config, fp32_run, optimized, load_bundle(tmp_path / "bundle"))

    # the float variant can go through onnxruntime's own quantization tools (stale intermediate
    # shapes left by the exporter would make their shape inference fail)
    quantize_dynamic(
        str(tmp_path / "bundle" / manifest.variants["full"].file),
        str(tmp_path / "quantized.onnx"),
        weight_type=QuantType.QInt8,
    )
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "quantized.onnx"), load_external_data=False).graph.node)
    assert ops["DynamicQuantizeLinear"] > 0


def test_tensorrt_profile_carries_static_symmetric_int8_scales(dit_digits, fp32_run, tmp_path):
    config, graph = dit_digits
    sampler = Sampler(make_scheduler(config, "ddim", 50), progress=False)
    calibration = calibrate(
        optimize(graph).program, sampler, (torch.arange(4),), (4, 1, 16, 16), seeds=(5,), progress=False
    )
    optimized = optimize(graph, [TemporalDifferencePass("difference")], calibration=calibration)
    manifest = to_onnx(optimized, tmp_path / "bundle", profile="tensorrt")  # checks the TensorRT operator list
    scales = {s["scale"] for s in manifest.quantization[DELTA]}
    assert {s["zero_point"] for s in manifest.quantization[DELTA]} == {0} and len(manifest.quantization[DELTA]) == 47

    model = onnx.load(str(tmp_path / "bundle" / manifest.variants[DELTA].file))
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    constants |= {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in model.graph.node
        if n.op_type == "Constant" and n.attribute[0].name == "value"
    }
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 47  # 46 linear layer groups and the patch-embedding conv
    for node in quantizers:  # build-time constant, scalar, symmetric (int8 zero point 0)
        scale, zero_point = constants[node.input[1]], constants[node.input[2]]
        assert scale.shape == () and zero_point.dtype == np.int8 and zero_point == 0
        assert min(abs(float(scale) - s) for s in scales) <= 1e-7 * float(scale)

    _assert_onnxruntime_runs_the_same_lossy_method(config, fp32_run, optimized, load_bundle(tmp_path / "bundle"))


def test_integer_emulation_is_refused_with_a_clear_error(dit_digits, tmp_path):
    config, graph = dit_digits
    sampler = Sampler(make_scheduler(config, "ddim", 10), progress=False)
    calibration = calibrate(
        optimize(graph).program, sampler, (torch.arange(2),), (2, 1, 16, 16), seeds=(5,), progress=False
    )
    with pytest.raises(ExportError, match="float64.*'dynamic'"):
        to_onnx(optimize(graph, [TemporalDifferencePass("integer")], calibration=calibration), tmp_path)
