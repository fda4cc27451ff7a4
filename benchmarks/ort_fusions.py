"""Which onnxruntime graph fusions fire on diffopt's exported variants.

    python benchmarks/ort_fusions.py   # writes benchmarks/results/ort_fusions.{json,md}

Exports dit-digits with no passes and with the forecast cache over its block span, in fp32
and int8-dynamic, then lets onnxruntime write each variant as it runs it (``ORT_ENABLE_ALL``,
the level ``OnnxRuntimeBackend`` uses; ``optimized_model_filepath``) and counts the operator
types before and after: fused operators (``FusedMatMul``, ``SkipLayerNormalization``,
``BiasGelu``, ``Attention``, ``MatMulIntegerToFloat`` ...) replace the patterns they matched.
"""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

from diffopt import capture, optimize
from diffopt.export import to_onnx
from diffopt.models import example_inputs, load
from diffopt.passes.forecast_cache import ForecastCachePass

RESULTS = Path("benchmarks/results")
PROGRAMS = {
    "no passes": [],
    "forecast span o2 p4 w2": [ForecastCachePass(order=2, period=4, warmup=2, targets="blocks")],
}
PRECISIONS = ("fp32", "int8-dynamic")


def op_counts(path: Path) -> collections.Counter:
    import onnx

    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def optimized_counts(path: Path, directory: Path) -> collections.Counter:
    """The operator counts of ``path`` as onnxruntime runs it on the CPU (every optimization on)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(directory / f"{path.stem}.optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return op_counts(Path(options.optimized_model_filepath))


def main() -> None:
    model, config = load("dit-digits")
    graph = capture(model, example_inputs("dit-digits"))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, passes in PROGRAMS.items():
            optimized = optimize(graph, passes)
            for precision in PRECISIONS:
                directory = Path(workdir) / f"{name}_{precision}".replace(" ", "_")
                manifest = to_onnx(optimized, directory, scheduler_config=config, precision=precision)
                for variant, entry in manifest.variants.items():
                    before = op_counts(directory / entry.file)
                    after = optimized_counts(directory / entry.file, Path(workdir))
                    rows.append(
                        {
                            "program": name,
                            "precision": precision,
                            "variant": variant,
                            "nodes_before": sum(before.values()),
                            "nodes_after": sum(after.values()),
                            "new_ops": {op: n for op, n in sorted(after.items()) if op not in before},
                            "gone_ops": {op: n for op, n in sorted(before.items()) if op not in after},
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python benchmarks/ort_fusions.py", "rows": rows}
    (RESULTS / "ort_fusions.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / "ort_fusions.md").write_text(markdown(payload))
    print(markdown(payload))


def markdown(payload: dict) -> str:
    lines = [
        "# onnxruntime fusions on dit-digits' exported variants (CPU, ORT_ENABLE_ALL)",
        "",
        f"Produced by `{payload['command']}`. Operators that appear only after optimization are the fusions "
        f"that fired; those that disappear are what they absorbed.",
        "",
        "| program | precision | variant | nodes before -> after | fused operators that appeared | operators gone |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        new = ", ".join(f"{op} x{n}" for op, n in r["new_ops"].items()) or "none"
        gone = ", ".join(f"{op} x{n}" for op, n in r["gone_ops"].items()) or "none"
        lines.append(
            f"| {r['program']} | {r['precision']} | {r['variant']} | {r['nodes_before']} -> {r['nodes_after']} "
            f"| {new} | {gone} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
