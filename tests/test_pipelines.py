"""``diffopt.enable`` inside a diffusers pipeline built offline from tiny random parts."""

import copy

import pytest
import torch
from models import diffusers_dit

import diffopt
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.temporal_difference import TemporalDifferencePass
from diffopt.pipelines import OptimizedComponent


@pytest.fixture
def pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=1,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
    ).eval()
    return DiTPipeline(transformer=diffusers_dit(seed=1, num_layers=3), vae=vae, scheduler=DDIMScheduler())


def _images(pipe, labels=(1, 2), steps=8):
    images = pipe(
        class_labels=list(labels),
        guidance_scale=1.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return torch.as_tensor(images)


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


def test_identity_and_disable_restore_the_pipeline(pipe):
    original = pipe.transformer
    expected = _images(pipe)
    diffopt.enable(pipe)
    assert isinstance(pipe.transformer, OptimizedComponent) and pipe.transformer.config is original.config
    assert pipe.transformer.dtype == original.dtype and pipe.transformer.device == original.device
    assert (_images(pipe) - expected).abs().max() < 1e-4
    assert (_images(pipe, labels=(3,)) - _images_with(original, pipe, labels=(3,))).abs().max() < 1e-4  # batch 1
    with pytest.raises(ValueError, match="already enabled"):
        diffopt.enable(pipe)
    diffopt.disable(pipe)
    assert pipe.transformer is original
    with pytest.raises(ValueError, match="not enabled"):
        diffopt.disable(pipe)


def _images_with(model, pipe, labels):
    enabled = pipe.transformer
    pipe.transformer = model
    try:
        return _images(pipe, labels)
    finally:
        pipe.transformer = enabled


def test_exact_temporal_differences_and_block_caches_run_in_the_pipeline(pipe):
    expected = _images(pipe)
    diffopt.enable(pipe, [TemporalDifferencePass("exact")])
    assert (_images(pipe) - expected).abs().max() < 1e-4
    diffopt.disable(pipe)
    diffopt.enable(pipe, [BlockCachePass(period=2)])
    cached = _images(pipe)
    assert pipe.transformer.denoiser.last_variant == "cached"  # step 7 of 8, period 2
    assert 0 < (cached - expected).abs().max() < 0.5  # steps were reused, the picture stays close


def test_first_block_cache_equals_diffusers_hook_on_the_same_weights(pipe):
    hooked = copy.deepcopy(pipe)
    diffopt.enable(pipe, [FirstBlockCachePass(0.2)])
    ours = _images(pipe)
    theirs = _with_first_block_cache_hook(hooked, 0.2, lambda: _images(hooked))
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - _images_with(pipe.transformer.original, pipe, (1, 2))).abs().max() > 1e-4  # it cached


def test_moving_recaptures_and_changed_flags_are_named(pipe):
    diffopt.enable(pipe)
    _images(pipe)
    assert pipe.transformer.denoiser is not None
    pipe.to("cpu")
    assert pipe.transformer.denoiser is None  # captured again on the new placement at the next call
    _images(pipe)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="captured with cross_attention_kwargs=None"):
        pipe.transformer(x, timestep=t, class_labels=labels, cross_attention_kwargs={"scale": 0.5})
    out = pipe.transformer(x, timestep=t, class_labels=labels)
    assert type(out).__name__ == "Transformer2DModelOutput" and out.sample.shape == x.shape
    assert isinstance(pipe.transformer(x, timestep=t, class_labels=labels, return_dict=False), tuple)


@pytest.fixture
def pixart_pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline
    from models import diffusers_pixart

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
    ).eval()
    transformer = diffusers_pixart(seed=1)
    return PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )


def _pixart_images(pipe, mask):
    """Prompt embeddings instead of a text encoder; the attention mask hides padded tokens."""
    embeddings = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    images = pipe(
        prompt_embeds=embeddings,
        prompt_attention_mask=mask,
        guidance_scale=1.0,
        num_inference_steps=6,
        height=8,
        width=8,
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return torch.as_tensor(images)


def test_pixart_pipeline_with_an_attention_mask(pixart_pipe):
    full, padded = torch.ones(2, 5, dtype=torch.long), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = [_pixart_images(pixart_pipe, mask) for mask in (full, padded)]
    diffopt.enable(pixart_pipe)
    got = [_pixart_images(pixart_pipe, mask) for mask in (full, padded)]
    assert "encoder_attention_mask" in pixart_pipe.transformer.denoiser.program.signature.conditions
    assert all((g - e).abs().max() < 1e-4 for g, e in zip(got, expected))  # the mask is an input, not a constant
    assert (expected[0] - expected[1]).abs().max() > 1e-4
    diffopt.disable(pixart_pipe)
    hooked = copy.deepcopy(pixart_pipe)
    diffopt.enable(pixart_pipe, [FirstBlockCachePass(0.2)])  # was: a symbolic size counted as a block output
    ours = _pixart_images(pixart_pipe, padded)
    theirs = _with_first_block_cache_hook(hooked, 0.2, lambda: _pixart_images(hooked, padded))
    assert (ours - theirs).abs().max() < 1e-4 and (ours - expected[1]).abs().max() > 1e-4
