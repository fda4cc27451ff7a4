"""Numbers that say what ran, and tune outputs that are one run's, whole (outside review):
``summary``'s work saved is the MACs that really ran; a candidate without steps runs the
calls' own; tune's files keep the stem as given and never mix two runs; held-out seeds never
overlap the scored ones; NaN inputs and metrics are named as NaN."""

import json

import pytest
import torch
from test_pipelines import CASES, _sd3, _text

import diffopt
from diffopt.cli import main
from diffopt.measure import search
from diffopt.measure.macs import count_macs
from diffopt.measure.workload import Configuration
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.pipelines.tuning import VALIDATION_SEED_OFFSET, held_out_calls

STEPS = 6
FAMILIES = {
    "DiT": (CASES["DiTPipeline"].build, {"class_labels": [1, 2], "guidance_scale": 1.0}),
    "SD3": (_sd3, {**_text(16, pooled=8), "height": 8, "width": 8, "guidance_scale": 2.0}),
}
CACHES = {
    "first-block cache, always full": FirstBlockCachePass(threshold=0.0),
    "first-block cache, mostly cached": FirstBlockCachePass(threshold=10.0),
    "block cache": BlockCachePass(period=2),
    "forecast cache": ForecastCachePass(order=1, period=2),
}


def _denoiser_macs(pipe, call) -> int:
    """MACs of the denoiser's calls alone (DiTPipeline decodes with its VAE whatever it is asked)."""
    counters, total = [], [0]

    def start(module, args):
        counters.append(count_macs().__enter__())

    def stop(module, args, output):
        counter = counters.pop()
        counter.__exit__(None, None, None)
        total[0] += counter.macs

    hooks = [pipe.transformer.register_forward_pre_hook(start), pipe.transformer.register_forward_hook(stop)]
    try:
        pipe(**call, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_summary_work_saved_is_the_macs_that_ran(family, cache):
    build, call = FAMILIES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    plain = _denoiser_macs(pipe, call)
    diffopt.enable(pipe, [CACHES[cache]])
    _denoiser_macs(pipe, call)  # captures
    optimized = _denoiser_macs(pipe, call)
    runs = diffopt.summary(pipe).runs
    last = max(r.run for r in runs)
    spent = [len(r.variants) * (1 - r.work_saved) for r in runs if r.run == last]
    reported = sum(spent) / sum(len(r.variants) for r in runs if r.run == last)
    assert reported == pytest.approx(optimized / plain, rel=0.01)


def _bench_file(path):
    configurations = [
        {"name": "identity, no steps given", "passes": []},
        {"name": "block cache, no steps given", "passes": [{"pass": "BlockCachePass", "period": 2}]},
        {"name": "4 steps", "passes": [], "steps": 4},
    ]
    path.write_text(json.dumps({"configurations": configurations}))
    return path


def test_a_candidate_without_steps_runs_the_calls_own_steps(tmp_path):
    directory = tmp_path / "pipe"
    CASES["DiTPipeline"].build().save_pretrained(directory)
    calls = tmp_path / "calls.json"
    calls.write_text(json.dumps([{"class_labels": [1, 2], "guidance_scale": 1.0, "seed": 0}]))
    stem = tmp_path / "bench"
    main(
        ["bench", str(_bench_file(tmp_path / "c.json")), "--out", str(stem), "--pipeline", str(directory)]
        + ["--calls", str(calls), "--steps", str(STEPS), "--repeats", "1"]
    )
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows["identity, no steps given"]["steps"] == STEPS
    assert rows["identity, no steps given"]["mac_fraction"] == pytest.approx(1.0)
    assert rows["identity, no steps given"]["psnr"] == float("inf")
    assert 0.4 < rows["block cache, no steps given"]["mac_fraction"] < 1.0
    assert rows["4 steps"]["mac_fraction"] == pytest.approx(4 / STEPS)


def _summary(name="a", run_id=None):
    chosen = {
        "name": name,
        "family": "steps",
        "passes": [{"pass": "BlockCachePass", "period": 2}],
        "steps": 4,
        "psnr": 40.0,
        "validation_psnr": 39.0,
        "mac_fraction": 0.5,
    }
    summary = {
        "model": "m",
        "min_psnr": 30.0,
        "reference_steps": 8,
        "scored_on": "1 call",
        "validated_on": "1 call",
        "chosen": chosen,
        "pareto": [name],
        "rows": [chosen],
    }
    return {**summary, "run_id": run_id} if run_id else summary


def test_a_tune_stem_is_used_as_given(tmp_path):
    (tmp_path / "run-1.json").write_text("another run's file")
    search.save(_summary(), tmp_path / "run-1.5")
    assert (tmp_path / "run-1.json").read_text() == "another run's file"
    assert {p.name for p in tmp_path.iterdir()} >= {"run-1.5.json", "run-1.5.md", "run-1.5.passes.json"}
    summary, passes, fields = search.load_result(tmp_path / "run-1.5")
    assert summary["run_id"] == fields["run_id"] and passes[0] == BlockCachePass(period=2)


def test_an_interrupted_tune_write_leaves_the_earlier_set_whole(tmp_path, monkeypatch):
    stem = tmp_path / "tuned"
    search.save(_summary("first"), stem)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed(summary):
        raise KeyboardInterrupt  # a kill while the set is being written

    monkeypatch.setattr(search, "table", killed)
    with pytest.raises(KeyboardInterrupt):
        search.save(_summary("second"), stem)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no partial file left either
    assert search.load_result(stem)[0]["chosen"]["name"] == "first"


def test_a_mixed_set_of_tune_files_is_refused_on_load(tmp_path):
    search.save(_summary("first"), tmp_path / "one")
    search.save(_summary("second"), tmp_path / "two")
    (tmp_path / "one.passes.json").write_bytes((tmp_path / "two.passes.json").read_bytes())
    with pytest.raises(ValueError, match="come from different tune runs"):
        search.load_result(tmp_path / "one")


def test_held_out_seeds_never_overlap_the_scored_ones():
    calls = [{"seed": 0}, {"seed": VALIDATION_SEED_OFFSET}, {"seed": 2 * VALIDATION_SEED_OFFSET}, {"seed": 5}]
    held_out = [call["seed"] for call in held_out_calls(calls)]
    assert not set(held_out) & {call["seed"] for call in calls} and len(set(held_out)) == len(held_out)


def test_tune_names_nan_inputs_nan_metrics_and_a_floor_that_is_no_psnr(capsys):
    pipe = CASES["DiTPipeline"].build()
    call = {"class_labels": [1, 2], "guidance_scale": 1.0, "num_inference_steps": 3, "seed": 0}
    with pytest.raises(ValueError, match="min_psnr must be a finite number of dB > 0"):
        diffopt.tune(pipe, [call], -5)
    embeddings = {**_text(16), "seed": 0}
    embeddings["prompt_embeds"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"calls\[0\].prompt_embeds holds NaN"):
        diffopt.tune(pipe, [embeddings], 30.0)
    candidates = [Configuration("2 steps", (), 2, family="steps")]
    with pytest.raises(ValueError, match="the metric gave NaN for candidate '2 steps'"):
        diffopt.tune(
            pipe, [call], 1.0, candidates=candidates, metric=lambda o, r: float("nan"), min_metric=0, progress=False
        )
    assert "it/s" not in capsys.readouterr().err  # progress=False: no bars, the pipeline's own included
