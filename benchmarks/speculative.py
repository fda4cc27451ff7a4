"""Autospeculative DDPM vs sequential DDPM: rounds, model evaluations, wall time, quality.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speculative.py [--quick]

Writes benchmarks/results/speculative.json and .md. Rounds are the sequential depth of
model calls (what a parallel device turns into time); wall time is measured here on CPU,
where a round's batched verification costs more than one sequential step. Sequential
and speculative runs are interleaved per configuration (A B A B) and timed as medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from diffopt import Sampler, make_scheduler
from diffopt.evaluation.metrics.two_sample import energy_test
from diffopt.measure.timing import interleaved_times
from diffopt.models.gaussian_mixture import two_moons_mixture
from diffopt.sampling.noise import make_alphas_cumprod
from diffopt.sampling.speculative import SpeculativeDDPMSampler

OUT = Path("benchmarks/results")


def _compare(model, config, steps, windows, n, conditions, repeats, quality):
    alphas = make_alphas_cumprod(config["beta_schedule"], config.get("num_train_timesteps", 1000))
    shape = (n, *model_shape(model))
    sequential = Sampler(make_scheduler(config, "ddpm", steps), progress=False)
    rows = []
    for window in windows:
        speculative = SpeculativeDDPMSampler(
            alphas,
            steps,
            window=window,
            progress=False,
            prediction_type=config.get("prediction_type", "epsilon"),
            clip_sample=config.get("clip_sample"),
        )
        produced = {}

        def timed(name, sampler):
            def run(repeat):
                produced[name] = sampler.sample(model, conditions, shape=shape, seed=repeat)

            return run

        # interleaved A B A B, no warm-up round (each round draws its own noise, as before)
        samplers = {"sequential": sequential, "speculative": speculative}
        times = interleaved_times({name: timed(name, s) for name, s in samplers.items()}, repeats, warmup=0)
        seq_times, spec_times = times["sequential"], times["speculative"]
        seq_samples, spec_samples = produced["sequential"], produced["speculative"]
        stats = speculative.last_stats
        row = {
            "steps": steps,
            "window": window if window is not None else "unbounded",
            "samples": n,
            "sequential_rounds": steps,
            "rounds": stats.rounds,
            "round_speedup": steps / stats.rounds,
            "model_evaluations": stats.model_evaluations,
            "sequential_evaluations": steps * n,
            "evaluation_ratio": stats.model_evaluations / (steps * n),
            "acceptance_rate": stats.acceptance_rate,
            "sequential_s": statistics.median(seq_times),
            "speculative_s": statistics.median(spec_times),
        }
        row["wall_clock_speedup"] = row["sequential_s"] / row["speculative_s"]
        row.update(quality(seq_samples, spec_samples))
        rows.append(row)
        print(json.dumps(row))
    return rows


def model_shape(model):
    return getattr(model, "sample_shape", (1, 16, 16))


def mixture_quality(sequential, speculative):
    distance, p_value = energy_test(speculative, sequential, permutations=200)
    return {"energy_distance": distance, "energy_test_p": p_value}


def digits_quality(labels):
    from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd

    def measure(sequential, speculative):
        return {
            "fd_sequential": digits_fd(sequential),
            "fd_speculative": digits_fd(speculative),
            "accuracy_sequential": class_accuracy(sequential, labels),
            "accuracy_speculative": class_accuracy(speculative, labels),
        }

    return measure


def fd_seed_noise(model, config, labels, seeds: int) -> dict:
    """How much digits FD moves between seeds at this sample count: the yardstick for
    "FD within seed noise" (FD is biased upwards and noisy at small sample counts)."""
    from diffopt.evaluation.metrics.digits import digits_fd

    sampler = Sampler(make_scheduler(config, "ddpm", 50), progress=False)
    shape = (len(labels), *model_shape(model))
    fds = [digits_fd(sampler.sample(model, (labels,), shape=shape, seed=1000 + seed)) for seed in range(seeds)]
    row = {
        "seeds": seeds,
        "fd_mean": statistics.mean(fds),
        "fd_stdev": statistics.stdev(fds),
        "fd_min": min(fds),
        "fd_max": max(fds),
    }
    print(json.dumps(row))
    return row


def to_markdown(results) -> str:
    lines = [
        "# Autospeculative DDPM vs sequential DDPM",
        "",
        f"Command: `{results['command']}`. CPU: {results['threads']} threads. Wall times are medians of "
        f"interleaved runs; rounds = sequential depth of model calls.",
        "",
    ]
    for section, rows in results["sections"].items():
        lines += [f"## {section}", ""]
        keys = [k for k in rows[0] if k not in ("sequential_rounds", "sequential_evaluations")]
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for row in rows:
            lines.append(
                "| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="mixture only, fewer repeats")
    parser.add_argument("--digits-samples", type=int, default=100)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    sections = {}
    mixture = two_moons_mixture()
    config = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}
    sections["closed-form Gaussian mixture (2-D), 1000 samples"] = [
        row
        for steps in (50, 100, 1000)
        for row in _compare(mixture, config, steps, (4, 16, None), 1000, (), 2, mixture_quality)
    ]
    if not args.quick:
        from diffopt.models import load

        model, config = load("dit-digits")
        n = args.digits_samples
        labels = torch.arange(n) % 10
        section = []
        for steps, windows in ((50, (4, 16, None)), (100, (4, 16, None)), (1000, (16,))):
            section += _compare(model, config, steps, windows, n, (labels,), 1, digits_quality(labels))
        sections[f"dit-digits, {n} class-conditional samples"] = section
        sections[f"dit-digits FD seed noise at {n} samples (sequential DDPM, 50 steps)"] = [
            fd_seed_noise(model, config, labels, seeds=5)
        ]
    results = {
        "command": "python benchmarks/speculative.py"
        + (" --quick" if args.quick else "")
        + (f" --digits-samples {args.digits_samples}" if not args.quick else ""),
        "threads": threads,
        "sections": sections,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speculative.json").write_text(json.dumps(results, indent=2))
    (OUT / "speculative.md").write_text(to_markdown(results))
    print(f"wrote {OUT / 'speculative.json'} and {OUT / 'speculative.md'}")


if __name__ == "__main__":
    main()
