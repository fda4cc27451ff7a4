"""``diffopt.enable`` inside diffusers pipelines built offline from tiny random parts:
prompt embeddings instead of text encoders, a tiny random VAE."""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from models import (
    diffusers_controlnet,
    diffusers_dit,
    diffusers_flux,
    diffusers_pixart,
    diffusers_pixart_sigma,
    diffusers_sana,
    diffusers_sd3,
    diffusers_sdxl_unet,
    diffusers_wan,
    dit_pipeline,
    stable_diffusion_pipeline,
    tiny_vae,
)

import diffopt
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.passes.temporal_difference import TemporalDifferencePass
from diffopt.pipelines import OptimizedComponent

FLUX_CHAINS = ("transformer_blocks", "single_transformer_blocks")  # joined, as diffusers' hooks walk Flux
PADDED_MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # PixArt: the first prompt has 3 tokens


def _embeddings(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    """A pipeline, the arguments of one call, and where diffusers' FirstBlockCache hook applies."""

    build: Callable[[], Any]  # a new pipeline
    call: dict = field(default_factory=dict)
    hook_threshold: float | None = None  # None: the hook does not support this denoiser
    container: str | tuple[str, ...] | None = None  # FirstBlockCachePass(container=...)


def _pixart():
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    return PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(4),
        transformer=diffusers_pixart(seed=1),
        scheduler=DDIMScheduler(),
    )


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    encoders = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    return StableDiffusion3Pipeline(
        transformer=diffusers_sd3(seed=1), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(4), **encoders
    )


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    encoders = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2")}
    return FluxPipeline(
        transformer=diffusers_flux(seed=1), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(1), **encoders
    )


def _text(width, pooled=None, negative=True):
    """Prompt (and negative prompt) embeddings for two images: 5 tokens of ``width``."""
    call = {"prompt_embeds": _embeddings(2, 5, width, seed=1)}
    if negative:
        call["negative_prompt_embeds"] = _embeddings(2, 5, width, seed=2)
    if pooled:
        call["pooled_prompt_embeds"] = _embeddings(2, pooled, seed=3)
        call["negative_pooled_prompt_embeds"] = _embeddings(2, pooled, seed=4)
    return call


CASES = {
    "DiTPipeline": Case(dit_pipeline, {"class_labels": [1, 2], "guidance_scale": 1.0}, hook_threshold=0.2),
    "PixArtAlphaPipeline": Case(
        _pixart,
        {
            **_text(32, negative=False),
            "prompt_attention_mask": PADDED_MASK,
            "guidance_scale": 1.0,
            "use_resolution_binning": False,
        },
        hook_threshold=0.2,
    ),
    "StableDiffusionPipeline": Case(stable_diffusion_pipeline, {**_text(16), "guidance_scale": 2.0}),  # batched CFG
    # diffusers' FirstBlockCache hook fails on SD3 (its last block returns no text stream);
    # tests/test_dual_stream_blocks.py checks diffopt's against an independent reference
    "StableDiffusion3Pipeline": Case(_sd3, {**_text(16, pooled=8), "guidance_scale": 2.0}),
    "FluxPipeline": Case(  # true CFG: two calls per step, in cache_context("cond") and ("uncond")
        _flux,
        {**_text(16, pooled=8), "true_cfg_scale": 2.0},
        hook_threshold=0.2,
        container=FLUX_CHAINS,
    ),
}
FIXED_SCHEDULES = {  # passes whose schedule does not depend on the values (on Flux)
    "block cache": BlockCachePass(period=2),
    "forecast": ForecastCachePass(order=1, period=2, container=FLUX_CHAINS),
    "icc": IncrementCalibratedCachePass(rank=4, period=2),
    "ditto exact": TemporalDifferencePass("exact"),  # exact: the run equals the plain pipeline's
}


def _images(pipe, case, steps=6, output_type="np", **changes):
    call = {"height": 8, "width": 8, **case.call, **changes}
    if "class_labels" in call:  # DiTPipeline takes no size
        del call["height"], call["width"]
    images = pipe(
        **call, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type=output_type
    ).images
    return torch.as_tensor(images)


def _run_enabled(pipe, case, passes, **changes):
    diffopt.enable(pipe, passes)
    try:
        return _images(pipe, case, **changes), pipe.components[_denoiser(pipe)].denoiser.last_variant
    finally:
        diffopt.disable(pipe)


def _denoiser(pipe):
    return "unet" if hasattr(pipe, "unet") else "transformer"


def _with_first_block_cache_hook(pipe, threshold, run):
    """``run()`` with diffusers' own FirstBlockCache hook on ``pipe``'s transformer (the same
    weights); the cache context is set around the run, as pipelines with CacheMixin do."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
    _set_cache_context(pipe.transformer, CacheContext("denoise"))
    try:
        return run()
    finally:
        _set_cache_context(pipe.transformer, None)


@pytest.mark.parametrize("name", CASES)
def test_identity_exact_temporal_differences_and_block_cache_run_in_the_pipeline(name):
    case = CASES[name]
    pipe = case.build()
    expected = _images(pipe, case)
    identity, _ = _run_enabled(pipe, case, [])
    exact, _ = _run_enabled(pipe, case, [TemporalDifferencePass("exact")])
    cached, variant = _run_enabled(pipe, case, [BlockCachePass(period=2)])
    assert (identity - expected).abs().max() < 1e-4 and (exact - expected).abs().max() < 1e-4
    assert variant == "cached"  # step 5 of 6, period 2
    assert 0 < (cached - expected).abs().max() < 0.5  # steps were reused, the picture stays close


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.hook_threshold is not None])
def test_first_block_cache_equals_diffusers_hook_on_the_same_weights(name):
    case = CASES[name]
    pipe = case.build()
    hooked = copy.deepcopy(pipe)
    ours, _ = _run_enabled(pipe, case, [FirstBlockCachePass(case.hook_threshold, container=case.container)])
    theirs = _with_first_block_cache_hook(hooked, case.hook_threshold, lambda: _images(hooked, case))
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - _images(pipe, case)).abs().max() > 1e-4  # it cached


class _BatchedGuidance(torch.nn.Module):
    """The reference for a two-call CFG loop: at the cond call it runs cond and uncond as one
    batch through its own optimized component, and answers the uncond call from that."""

    def __init__(self, component, negative):
        super().__init__()
        self.component, self.negative, self.pending = component, negative, None
        self.config, self.dtype, self.device = component.config, component.dtype, component.device

    def cache_context(self, name):
        return self.component.cache_context("batched")

    def forward(self, **kwargs):
        if self.pending is not None:
            out, self.pending = self.pending, None
            return (out,)
        batched = dict(kwargs)
        for key in ("hidden_states", "timestep"):
            batched[key] = torch.cat([kwargs[key], kwargs[key]])
        for key, value in self.negative.items():
            batched[key] = torch.cat([kwargs[key], value])
        out = self.component(**batched)[0]
        cond, self.pending = out.chunk(2)
        return (cond,)


@pytest.mark.parametrize("pass_name", FIXED_SCHEDULES)
def test_true_cfg_two_calls_per_step_equal_the_batched_run(pass_name):
    case = CASES["FluxPipeline"]
    pipe = case.build()
    two_calls, _ = _run_enabled(pipe, case, [FIXED_SCHEDULES[pass_name]], output_type="latent")
    negative = {
        "encoder_hidden_states": case.call["negative_prompt_embeds"],
        "pooled_projections": case.call["negative_pooled_prompt_embeds"],
    }
    original = pipe.transformer
    pipe.transformer = _BatchedGuidance(
        OptimizedComponent(original, [FIXED_SCHEDULES[pass_name]], None, None), negative
    )
    try:
        batched = _images(pipe, case, output_type="latent")
    finally:
        pipe.transformer = original
    assert float((two_calls - batched).norm() / batched.norm()) < 1e-5
    change = float((two_calls - _images(pipe, case, output_type="latent")).abs().max())
    assert change < 1e-4 if pass_name == "ditto exact" else change > 1e-4  # a cache reused values


def test_identity_and_disable_restore_the_pipeline():
    case = CASES["DiTPipeline"]
    pipe = case.build()
    original = pipe.transformer
    expected, expected_single = _images(pipe, case), _images(pipe, case, class_labels=[3])
    diffopt.enable(pipe)
    assert isinstance(pipe.transformer, OptimizedComponent) and pipe.transformer.config is original.config
    assert pipe.transformer.dtype == original.dtype and pipe.transformer.device == original.device
    assert (_images(pipe, case) - expected).abs().max() < 1e-4
    assert (_images(pipe, case, class_labels=[3]) - expected_single).abs().max() < 1e-4  # batch 1
    with pytest.raises(ValueError, match="already enabled"):
        diffopt.enable(pipe)
    diffopt.disable(pipe)
    assert pipe.transformer is original
    with pytest.raises(ValueError, match="not enabled"):
        diffopt.disable(pipe)


def test_moving_recaptures_and_changed_flags_capture_another_program():
    case = CASES["DiTPipeline"]
    pipe = diffopt.enable(case.build())
    _images(pipe, case)
    assert pipe.transformer.denoiser is not None
    pipe.to("cpu")
    assert pipe.transformer.denoiser is None  # captured again on the new placement at the next call
    _images(pipe, case)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2])
    flagged = pipe.transformer(x, timestep=t, class_labels=labels, cross_attention_kwargs={"scale": 0.5})[0]
    assert len(pipe.transformer.programs) == 2  # a changed flag is another program, not an error
    expected = pipe.transformer.original(x, timestep=t, class_labels=labels, cross_attention_kwargs={"scale": 0.5})
    assert (flagged - expected.sample).abs().max() < 1e-5
    out = pipe.transformer(x, timestep=t, class_labels=labels)
    assert len(pipe.transformer.programs) == 2
    assert type(out).__name__ == "Transformer2DModelOutput" and out.sample.shape == x.shape
    assert isinstance(pipe.transformer(x, timestep=t, class_labels=labels, return_dict=False), tuple)
    with pytest.raises(ValueError, match="a cache context name is a non-empty string, found ''"):
        with pipe.transformer.cache_context(""):
            pass


def test_pixart_attention_mask_is_an_input_not_a_constant():
    case = CASES["PixArtAlphaPipeline"]
    pipe = case.build()
    full = torch.ones(2, 5, dtype=torch.long)
    expected = [_images(pipe, case, prompt_attention_mask=mask) for mask in (full, PADDED_MASK)]
    diffopt.enable(pipe)
    got = [_images(pipe, case, prompt_attention_mask=mask) for mask in (full, PADDED_MASK)]
    assert "encoder_attention_mask" in pipe.transformer.denoiser.program.signature.conditions
    assert all((g - e).abs().max() < 1e-4 for g, e in zip(got, expected))
    assert (expected[0] - expected[1]).abs().max() > 1e-4


def _sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    encoders = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2")}
    return StableDiffusionXLPipeline(
        vae=tiny_vae(4), unet=diffusers_sdxl_unet(seed=1), scheduler=EulerDiscreteScheduler(), **encoders
    )


def _without_text_encoder(pipeline: str, transformer, scheduler: str, **kwargs):
    """A pipeline of class ``pipeline`` with prompt embeddings instead of a text encoder and no VAE
    (latents out)."""
    import diffusers

    return getattr(diffusers, pipeline)(
        vae=None,
        transformer=transformer,
        scheduler=getattr(diffusers, scheduler)(**kwargs),
        tokenizer=None,
        text_encoder=None,
    )


def _wan():
    return _without_text_encoder("WanPipeline", diffusers_wan(seed=1), "FlowMatchEulerDiscreteScheduler", shift=3.0)


def _pixart_sigma():
    return _without_text_encoder("PixArtSigmaPipeline", diffusers_pixart_sigma(seed=1), "DPMSolverMultistepScheduler")


def _sana():
    return _without_text_encoder("SanaPipeline", diffusers_sana(seed=1), "FlowMatchEulerDiscreteScheduler")


def _controlnet():
    from diffusers import StableDiffusionControlNetPipeline

    parts = stable_diffusion_pipeline().components
    return StableDiffusionControlNetPipeline(
        **parts, controlnet=diffusers_controlnet(parts["unet"]), requires_safety_checker=False
    )


def _heun():
    from diffusers import DiTPipeline, HeunDiscreteScheduler

    return DiTPipeline(
        transformer=diffusers_dit(seed=3, num_layers=2), vae=tiny_vae(1), scheduler=HeunDiscreteScheduler()
    )


def _masked_text(width, tokens=5):
    """Prompt embeddings for two images with a padded mask (the first prompt is 3 tokens long)."""
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[0, 3:] = 0
    return {
        "prompt_embeds": _embeddings(2, tokens, width, seed=1),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": _embeddings(2, tokens, width, seed=2),
        "negative_prompt_attention_mask": torch.ones(2, tokens, dtype=torch.long),
        "negative_prompt": None,
        "use_resolution_binning": False,
    }


@dataclass
class Family:
    """A pipeline family the first drop-in tests did not build, one call of it, and a cache for it."""

    build: Callable[[], Any]
    call: dict
    cache: Any  # a caching pass that must run (its last step reuses)
    output: str = "images"  # the attribute of the pipeline's output that holds the result


CONTROL_IMAGE = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
FAMILIES = {
    "SDXL (text_time added conditions)": Family(
        _sdxl,
        {**_text(24, pooled=8), "height": 8, "width": 8, "guidance_scale": 3.0},
        BlockCachePass(period=2),
    ),
    "Wan (video, true CFG)": Family(
        _wan,
        {
            "prompt_embeds": _embeddings(1, 6, 12, seed=1),
            "negative_prompt_embeds": _embeddings(1, 6, 12, seed=2),
            "height": 16,
            "width": 16,
            "num_frames": 5,
            "guidance_scale": 2.0,
        },
        ForecastCachePass(order=1, period=2),
        output="frames",
    ),
    "PixArt-Sigma (masked)": Family(
        _pixart_sigma,
        {**_masked_text(20), "height": 64, "width": 64, "guidance_scale": 2.0},
        FirstBlockCachePass(threshold=0.5),
    ),
    "Sana (masked)": Family(
        _sana,
        {**_masked_text(12), "height": 256, "width": 256, "guidance_scale": 2.0},
        BlockCachePass(period=2),
    ),
    "ControlNet SD (tuple of residuals)": Family(
        _controlnet,
        {**_text(16), "image": CONTROL_IMAGE, "height": 8, "width": 8, "guidance_scale": 2.0},
        BlockCachePass(blocks=("up_blocks.1",), period=2),  # DeepCache
    ),
    "DiT with Heun (two calls per step)": Family(
        _heun, {"class_labels": [1, 2], "guidance_scale": 1.0}, BlockCachePass(period=2)
    ),
}


def _latents(pipe, family, steps=4, **changes):
    result = pipe(
        **{**family.call, **changes},
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return torch.as_tensor(getattr(result, family.output))


@pytest.mark.parametrize("name", FAMILIES)
def test_more_families_identity_and_a_cache_that_runs(name):
    family = FAMILIES[name]
    pipe = family.build()
    expected = _latents(pipe, family)
    diffopt.enable(pipe)
    identity = _latents(pipe, family)
    diffopt.disable(pipe)
    diffopt.enable(pipe, [family.cache])
    cached = _latents(pipe, family)
    report = diffopt.summary(pipe)
    diffopt.disable(pipe)
    assert float((identity - expected).abs().max()) < 1e-5 * float(expected.abs().max())
    assert 0 < float((cached - expected).norm() / expected.norm()) < 1.0  # reused, not garbage
    last_run = [r for r in report.runs if r.run == report.runs[-1].run]
    assert all(set(r.counts) - {"full"} for r in last_run), str(report)  # every stream reused at some step
    if not isinstance(family.cache, FirstBlockCachePass):  # a probe's cost can exceed what tiny blocks save
        assert all(r.work_saved > 0 for r in last_run), str(report)
    if "Heun" in name:  # 4 steps are 7 calls of one stream: the repeated timestep stays in it
        assert [r.variants for r in last_run] == [("full", "cached") * 3 + ("full",)]
