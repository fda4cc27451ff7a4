"""Nothing in the step loop waits on the device: whole sampling loops run on the ``meta``
device (shapes and dtypes only; reading any value fails there), for every built-in pass in
the registry, with integer- and float-timestep models, through ``sample()`` and through the
eager ``__call__`` in a run scope. The one read a step makes, an adaptive schedule's probe
signal (``runtime.denoiser.probe_signal``), is the documented exception: on ``meta`` it is
answered here with a fixed value and counted."""

import contextlib

import pytest
import torch
from models import diffusers_dit, inputs_for, simple_dit

import diffopt.runtime.denoiser as denoiser_module
from diffopt import calibrate, capture, optimize
from diffopt.models.flow_map import FlowMapTransformer
from diffopt.passes.registry import registered_passes
from diffopt.sampling.flow_map import FlowMapSampler
from diffopt.sampling.schedulers import make_scheduler
from diffopt.sampling.sequential import Sampler

BUILT_IN = {name: cls for name, cls in registered_passes().items() if cls.__module__.startswith("diffopt.passes.")}
OPTIONS = {"ForecastCachePass": {"targets": "blocks"}}  # the tiny models' blocks have no attention modules to name
SHAPE = (2, 1, 16, 16)
LABELS = torch.tensor([0, 3])


@pytest.fixture
def probe_reads(monkeypatch):
    """Answers probe-signal reads of meta tensors with 0.0 (reuse) and counts them."""
    reads = []
    real = denoiser_module.probe_signal

    def on_meta(signal):
        if signal.device.type != "meta":
            return real(signal)
        reads.append(signal.shape)
        return 0.0

    monkeypatch.setattr(denoiser_module, "probe_signal", on_meta)
    return reads


def _programs(model, example, sampler, shape):
    """(pass name, a program on ``meta`` with that pass) for every built-in pass."""
    graph = capture(model, example)
    statistics = calibrate(optimize(graph).program, sampler, example[2:] or (LABELS,), shape, progress=False)
    for name, cls in sorted(BUILT_IN.items()):
        yield name, optimize(graph, [cls(**OPTIONS.get(name, {}))], calibration=statistics, device="meta")


class Eager:
    """The denoiser as a plain model: the sampler calls its eager ``__call__``."""

    def __init__(self, denoiser):
        self.denoiser, self.device = denoiser, denoiser.device

    def __call__(self, x, t, *conditions):
        return self.denoiser(x, t, *conditions)


def _runs(program):
    """(runner, scope) pairs: the functional ``step`` via ``sample()``, and the eager
    ``__call__`` inside a run scope (as a pipeline call opens one)."""
    return [(program, contextlib.nullcontext()), (Eager(program), program.run_scope())]


@pytest.mark.parametrize("timestep_dtype", [torch.int64, torch.float32], ids=["integer t", "float t"])
def test_sampling_loops_on_meta_read_nothing_but_probe_signals(timestep_dtype, probe_reads):
    sampler = Sampler(make_scheduler({"kind": "ddpm"}, "ddim", 4), progress=False)  # integer timesteps
    example = (torch.randn(SHAPE), torch.tensor([999, 5], dtype=timestep_dtype), LABELS)
    adaptive = []
    for name, program in _programs(simple_dit(), example, sampler, SHAPE):
        reads_before = len(probe_reads)
        for run, scope in _runs(program):
            with scope:
                out = sampler.sample(run, (LABELS,), shape=SHAPE, seed=0)
            assert out.device.type == "meta" and out.shape == SHAPE, name
        if program.program.schedule.probes:
            adaptive.append(name)
            assert len(probe_reads) - reads_before == 2 * 4, name  # one probe read per step, per run
        else:
            assert len(probe_reads) == reads_before, f"{name} read a probe signal without a probe"
    assert adaptive == ["FirstBlockCachePass"]  # the registry's adaptive passes (defaults)


CACHE_PARTS = [  # (target, policy, predictor): every policy and predictor of passes.caching
    ("span", {"kind": "taylorseer", "warmup": 1, "period": 2}, {"kind": "taylorseer", "order": 2}),
    ("span", {"kind": "mask", "steps": [1, 0, 1, 0]}, {"kind": "newton", "order": 2}),
    ("blocks", {"kind": "periodic", "period": 2}, {"kind": "learned", "history": 2, "weights": [[1.0, 0.0]] * 4}),
    ("after_first", {"kind": "error_gated", "threshold": 0.1}, {"kind": "newton", "order": 1}),
]


@pytest.mark.parametrize("target, policy, predictor", CACHE_PARTS, ids=[part[1]["kind"] for part in CACHE_PARTS])
def test_cache_parts_sample_on_meta(target, policy, predictor, probe_reads):
    from diffopt.passes.cache import CachePass

    sampler = Sampler(make_scheduler({"kind": "ddpm"}, "ddim", 4), progress=False)
    graph = capture(simple_dit(), (torch.randn(SHAPE), torch.tensor([999, 5]), LABELS))
    program = optimize(graph, [CachePass(target=target, policy=policy, predictor=predictor)], device="meta")
    for run, scope in _runs(program):
        with scope:
            out = sampler.sample(run, (LABELS,), shape=SHAPE, seed=0)
        assert out.device.type == "meta" and out.shape == SHAPE
    assert len(probe_reads) == (2 * 4 if policy["kind"] == "error_gated" else 0)


def test_flow_map_loops_on_meta(probe_reads):
    flow_map = FlowMapTransformer(diffusers_dit(0)).eval()
    inputs = inputs_for("diffusers_dit", 2, 0)
    t = inputs["timestep"].float()
    example = (inputs["hidden_states"], t, t * 0.5, inputs["class_labels"])
    graph = capture(flow_map, example)
    sampler = FlowMapSampler(times=[1.0, 0.6, 0.3, 0.0], progress=False)
    shape = tuple(inputs["hidden_states"].shape)
    for name, cls in sorted(BUILT_IN.items()):
        if cls().needs_calibration:  # calibration drives a Sampler with one timestep input
            continue
        program = optimize(graph, [cls(**OPTIONS.get(name, {}))], device="meta")
        for run, scope in _runs(program):
            with scope:
                out = sampler.sample(run, (inputs["class_labels"],), shape=shape, seed=0)
            assert out.device.type == "meta" and out.shape == shape, name
