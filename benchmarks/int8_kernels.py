"""Which CPU matmul kernels could make a quantized difference pay: the linear layers of
dit-digits at a sampling batch, timed in fp32, bf16 autocast, torch's dynamic-int8
linear (quantizes the activation per call, int8 weights, fused), and int8 x int8 ->
int32 ``torch._int_mm`` with and without the eager quantize / dequantize around it.

    python benchmarks/int8_kernels.py    # writes benchmarks/results/int8_kernels.{json,md}

Every kernel is timed interleaved with the others (A B C D A B C D ...), median of
``--repeats`` rounds of 20 calls. The rows are the layer shapes of dit-digits at batch
``--batch`` (64 tokens per sample). There is no CPU kernel for 4-bit activations in
torch or onnxruntime, so int4 is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch

from diffopt.measure.timing import median_times

RESULTS = Path("benchmarks/results")
SHAPES = {
    "attention q/k/v/out (128 -> 128)": (128, 128),
    "feed-forward in (128 -> 512)": (128, 512),
    "feed-forward out (512 -> 128)": (512, 128),
}


def kernels(rows: int, in_features: int, out_features: int) -> dict:
    x = torch.randn(rows, in_features)
    linear = torch.nn.Linear(in_features, out_features).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's quantized tensors are deprecated, still the fused CPU path
        dynamic = torch.ao.nn.quantized.dynamic.Linear(in_features, out_features)
        scale = linear.weight.abs().amax(1) / 127
        dynamic.set_weight_bias(
            torch.quantize_per_channel(
                linear.weight.detach(), scale, torch.zeros(out_features, dtype=torch.long), 0, torch.qint8
            ),
            linear.bias.detach(),
        )
    codes = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8)
    weight_codes = torch.randint(-127, 128, (in_features, out_features), dtype=torch.int8)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear(x)

    def int_mm_with_quantize():
        quantized = torch.clamp(torch.round(x / 0.05), -127, 127).to(torch.int8)
        return torch._int_mm(quantized, weight_codes).float() * 0.01

    return {
        "fp32": lambda: linear(x),
        "bf16 autocast": bf16,
        "dynamic int8 linear (fused)": lambda: dynamic(x),
        "_int_mm only": lambda: torch._int_mm(codes, weight_codes),
        "quantize + _int_mm + dequantize": int_mm_with_quantize,
    }


def interleaved_medians(functions: dict, repeats: int, number: int = 20) -> dict[str, float]:
    with torch.no_grad():
        return median_times({name: (lambda _, f=f: f()) for name, f in functions.items()}, repeats, number=number)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = args.batch * 64
    results = {}
    for label, (in_features, out_features) in SHAPES.items():
        results[label] = interleaved_medians(kernels(rows, in_features, out_features), args.repeats)
        print(label, {k: f"{v * 1e6:.0f} us" for k, v in results[label].items()}, flush=True)
    summary = {
        "batch": args.batch,
        "rows": rows,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "command": f"python benchmarks/int8_kernels.py --batch {args.batch} --repeats {args.repeats}",
        "seconds": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8_kernels.json").write_text(json.dumps(summary, indent=2))
    names = list(next(iter(results.values())))
    lines = [
        f"# CPU matmul kernels at dit-digits' layer shapes ({rows} rows = batch {args.batch} x 64 tokens)",
        "",
        f"`{summary['command']}` — median of {args.repeats} interleaved rounds, microseconds per call "
        f"(ratio to fp32), torch {torch.__version__}, {torch.get_num_threads()} threads, quantized engine "
        f"{summary['quantized_engine']}.",
        "",
        "| layer | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, timings in results.items():
        lines.append(
            f"| {label} | "
            + " | ".join(f"{timings[n] * 1e6:.0f} ({timings[n] / timings['fp32']:.2f})" for n in names)
            + " |"
        )
    (RESULTS / "int8_kernels.md").write_text("\n".join(lines) + "\n")
    print("wrote benchmarks/results/int8_kernels.{json,md}")


if __name__ == "__main__":
    main()
