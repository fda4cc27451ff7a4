"""Caching inside diffusers pipelines: diffopt tune's pick at a budget against the best plan of
diffusers' TaylorSeer hook at the same MACs, on the same pipeline calls.

    python benchmarks/pipeline_caching.py    # writes benchmarks/results/pipeline_caching.{json,md}

The pipelines (``--pipelines``):
- ``dit-digits``: ``DiTPipeline`` with the shipped dit-digits (``benchmarks/pipelines.py``),
  DDIM, 50 steps, class labels 0..9, no guidance;
- ``pixart-sigma``: a tiny ``PixArtSigmaPipeline`` (``tests/models.py``: three blocks, random
  weights, seeded), DDIM, 50 steps, classifier-free guidance 2.0 on seeded prompt
  embeddings, latents out.

Per budget (``--budgets``, fractions of the plain pipeline's MACs): ``diffopt.tune(pipe,
calls, budget=b)`` with its default search space, scored on ``SEARCH_SEEDS`` calls and
validated on its own held-out seeds. Then every row runs the same ``EVAL_SEEDS`` calls (seeds
neither tune saw): PSNR of its outputs against the plain pipeline's, and MACs counted as the
calls ran (``measure.macs.count_macs``), as a fraction of the plain pipeline's. The hook rows:
TaylorSeer with ``disable_cache_before_step`` D in {1, 3, 5}, ``cache_interval`` i in {3..8}
and ``max_order`` o in {1, 2} on the transformer blocks. The report pairs each tune pick
with the best hook plan whose MACs are at most the pick's budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from common import run_metadata
from pipelines import STEPS, HookedPipeline

import diffopt
from diffopt.measure.fidelity import psnr
from diffopt.measure.macs import count_macs
from diffopt.models import load
from diffopt.models.pipelines import PixelSpace
from diffopt.passes.registry import pass_from_dict

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the tiny PixArt-Sigma of the test models

BUDGETS = (0.25, 0.35)
SEARCH_SEEDS = (0,)
EVAL_SEEDS = (100, 101)
OUT = Path(__file__).parent / "results" / "pipeline_caching"


def dit_digits() -> tuple[object, dict]:
    from diffusers import DDIMScheduler, DiTPipeline

    model, _ = load("dit-digits")
    pipe = DiTPipeline(model, PixelSpace(), DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    return pipe, {"class_labels": list(range(10)), "guidance_scale": 1.0, "output_type": "pt"}


def pixart_sigma() -> tuple[object, dict]:
    from diffusers import DDIMScheduler, PixArtSigmaPipeline
    from models import diffusers_pixart_sigma

    transformer = diffusers_pixart_sigma(seed=1)
    pipe = PixArtSigmaPipeline(
        vae=None, transformer=transformer, scheduler=DDIMScheduler(), tokenizer=None, text_encoder=None
    )
    g = torch.Generator().manual_seed(5)
    call = {
        "prompt_embeds": torch.randn(4, 5, 20, generator=g),
        "prompt_attention_mask": torch.ones(4, 5, dtype=torch.long),
        "negative_prompt_embeds": torch.randn(4, 5, 20, generator=g),
        "negative_prompt_attention_mask": torch.ones(4, 5, dtype=torch.long),
        "negative_prompt": None,
        "use_resolution_binning": False,
        "height": 64,
        "width": 64,
        "guidance_scale": 2.0,
        "output_type": "latent",
    }
    return pipe, call


PIPELINES = {"dit-digits": dit_digits, "pixart-sigma": pixart_sigma}


def outputs(run, call: dict, seeds) -> tuple[torch.Tensor, float]:
    """``run``'s outputs of ``call`` with each seed (flattened, joined) and the MACs they ran."""
    results = []
    with count_macs() as counter:
        for seed in seeds:
            out = run(**call, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed))
            results.append(torch.as_tensor(out.images).flatten())
    return torch.cat(results), counter.macs


def hook_plans() -> list[tuple[str, dict]]:
    return [
        (
            f"diffusers TaylorSeer D{d} i{i} o{order}",
            {"disable_cache_before_step": d, "cache_interval": i, "max_order": order},
        )
        for d in (1, 3, 5)
        for i in range(3, 9)
        for order in (1, 2)
    ]


def measure_pipeline(name: str, budgets) -> dict:
    from diffusers import hooks

    pipe, call = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    reference, plain_macs = outputs(pipe, call, EVAL_SEEDS)
    data_range = 1.0 if call["output_type"] == "pt" else float(reference.max() - reference.min())

    def row(run, label: str, **extra) -> dict:
        outputs(run, call, SEARCH_SEEDS)  # a first call captures diffopt's graph: not counted
        got, macs = outputs(run, call, EVAL_SEEDS)
        result = {"name": label, "psnr": psnr(got, reference, data_range), "mac_fraction": macs / plain_macs, **extra}
        print(f"{name:14} {label[:70]:70} {result['psnr']:6.2f} dB  {result['mac_fraction']:.3f}", flush=True)
        return result

    rows = []
    for label, options in hook_plans():
        config = hooks.TaylorSeerCacheConfig(
            **options, taylor_factors_dtype=torch.float32, cache_identifiers=[r"transformer_blocks\.\d+"]
        )
        hooked = HookedPipeline(pipe, lambda m, config=config: hooks.apply_taylorseer_cache(m, config))
        rows.append(row(hooked, label, library="diffusers"))
    tuned = {}
    search_calls = [{**call, "num_inference_steps": STEPS, "seed": seed} for seed in SEARCH_SEEDS]
    for budget in budgets:
        started = time.perf_counter()
        summary = diffopt.tune(pipe, search_calls, budget=budget, progress=True)
        chosen = summary["chosen"]
        passes = [pass_from_dict(item) for item in chosen["passes"]]
        steps_fraction = chosen["steps"] / STEPS
        enabled = diffopt.enable(copy.deepcopy(pipe), passes)
        run = enabled if steps_fraction == 1 else _with_steps(enabled, round(STEPS * steps_fraction))
        tuned[str(budget)] = row(
            run,
            f"tune pick <= {budget}: {chosen['name']}",
            library="diffopt tune",
            budget=budget,
            passes=chosen["passes"],
            steps=chosen["steps"],
            tune_psnr=chosen["psnr"],
            tune_validation_psnr=chosen.get("validation_psnr"),
            tune_seconds=time.perf_counter() - started,
            candidates_scored=len(summary["rows"]),
        )
        rows.append(tuned[str(budget)])
    comparison = {}
    for budget, pick in tuned.items():
        fitting = [r for r in rows if r["library"] == "diffusers" and r["mac_fraction"] <= float(budget) + 1e-9]
        best = max(fitting, key=lambda r: r["psnr"]) if fitting else None
        comparison[budget] = {
            "tune": {k: pick[k] for k in ("name", "psnr", "mac_fraction")},
            "best hook": best and {k: best[k] for k in ("name", "psnr", "mac_fraction")},
            "tune - hook (dB)": pick["psnr"] - best["psnr"] if best else None,
        }
    return {
        "pipeline": name,
        "eval_seeds": EVAL_SEEDS,
        "search_seeds": SEARCH_SEEDS,
        "rows": rows,
        "comparison": comparison,
    }


def _with_steps(run, steps: int):
    """``run`` called with ``steps`` inference steps (a tune pick of fewer steps)."""

    def call(**kwargs):
        return run(**{**kwargs, "num_inference_steps": steps})

    return call


def markdown(payload: dict) -> str:
    lines = [
        "# Caching inside pipelines: diffopt tune's pick vs diffusers' TaylorSeer hook",
        "",
        f"`{payload['command']}`. {STEPS} DDIM steps; PSNR against the plain pipeline on calls with seeds "
        f"{list(EVAL_SEEDS)} (tune searched seeds {list(SEARCH_SEEDS)} and validated on its own held-out seeds); "
        "MACs counted as each row ran, over the plain pipeline's. Best hook: the best of its 36-plan sweep "
        "(D in {1,3,5}, i in 3..8, o in {1,2}, blocks) at MACs <= the budget.",
        "",
        "| pipeline | budget | tune's pick | PSNR | MACs | best hook plan | PSNR | MACs | tune - hook |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in payload["pipelines"]:
        for budget, pair in result["comparison"].items():
            tune, hook = pair["tune"], pair["best hook"]
            hook_cells = f"{hook['name']} | {hook['psnr']:.2f} | {hook['mac_fraction']:.3f}" if hook else "- | - | -"
            lead = f"{pair['tune - hook (dB)']:+.2f}" if hook else "-"
            lines.append(
                f"| {result['pipeline']} | {budget} | {tune['name']} | {tune['psnr']:.2f} | "
                f"{tune['mac_fraction']:.3f} | {hook_cells} | {lead} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    payload = {**run_metadata("pipeline_caching.py", args), "pipelines": []}
    payload["command"] = "python benchmarks/pipeline_caching.py " + " ".join(sys.argv[1:])
    earlier = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").exists() else None
    if earlier is not None:  # a run of some pipelines or budgets keeps the other results it did not redo
        payload["pipelines"] = earlier["pipelines"]
        payload["earlier_commands"] = [*earlier.get("earlier_commands", []), earlier["command"]]
    for name in args.pipelines:
        merge(payload["pipelines"], measure_pipeline(name, args.budgets))
        OUT.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
        OUT.with_suffix(".md").write_text(markdown(payload))


def merge(results: list[dict], result: dict) -> None:
    """``result`` (one pipeline's) into ``results``: its rows replace rows of the same name and its
    budgets' comparisons replace those budgets'; the other budgets' stay."""
    old = next((r for r in results if r["pipeline"] == result["pipeline"]), None)
    if old is None:
        results.append(result)
        return
    names = {row["name"] for row in result["rows"]}
    redone = tuple(f"tune pick <= {budget}:" for budget in result["comparison"])
    kept = [row for row in old["rows"] if row["name"] not in names and not row["name"].startswith(redone)]
    old["rows"] = kept + result["rows"]
    old["comparison"] = {**old["comparison"], **result["comparison"]}


if __name__ == "__main__":
    main()
