"""The drop-in as pipelines are really used: new resolutions and prompt lengths, refused and
cancelled calls, img2img after a cancel, abandoned runs, many short calls, saving, copying,
LoRA, threads, the compiled backend, early errors and the summary (tiny random parts)."""

import copy
import logging
import threading

import pytest
import torch
from models import diffusers_dit, dit_pipeline, stable_diffusion_pipeline, tiny_vae

import diffopt
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.pipelines import OptimizedComponent
from diffopt.runtime.streams import MAX_STREAMS


def _embeddings(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text(tokens=5, seed=1):
    return {
        "prompt_embeds": _embeddings(2, tokens, 16, seed=seed),
        "negative_prompt_embeds": _embeddings(2, tokens, 16, seed=seed + 1),
    }


def _sd_latents(pipe, steps=4, size=8, tokens=5, **changes):
    call = {**_text(tokens), "height": size, "width": size, "guidance_scale": 2.0, **changes}
    out = pipe(**call, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")
    return torch.as_tensor(out.images)


def _dit_latents(pipe, steps=4, **changes):
    call = {"class_labels": [1, 2], "guidance_scale": 1.0, **changes}
    out = pipe(**call, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")
    return torch.as_tensor(out.images)


def _close(a, b, tolerance=1e-5):
    return float((a - b).abs().max()) <= tolerance * max(1.0, float(b.abs().max()))


def test_a_new_resolution_or_prompt_length_captures_another_program(caplog):
    pipe = stable_diffusion_pipeline()
    expected = {(s, n): _sd_latents(pipe, size=s, tokens=n) for s, n in ((8, 5), (16, 5), (8, 7))}
    diffopt.enable(pipe)
    with caplog.at_level(logging.INFO, logger="diffopt"):
        got = {key: _sd_latents(pipe, size=key[0], tokens=key[1]) for key in expected}
    assert all(_close(got[key], expected[key]) for key in expected)
    assert len(pipe.unet.programs) == 3
    assert "sample: tensor('B', 4, 8, 8) float32 -> tensor('B', 4, 16, 16) float32" in caplog.text
    assert "encoder_hidden_states: tensor('B', 5, 16)" in caplog.text  # the prompt length is named
    diffopt.disable(pipe)
    diffopt.enable(pipe, [BlockCachePass(period=2)])
    for size in (8, 16):  # a cache still caches at the new size
        _sd_latents(pipe, size=size)
        assert pipe.unet.denoiser.last_variant == "cached"


def test_a_refused_call_changes_nothing():
    pipe = diffopt.enable(dit_pipeline(), [BlockCachePass(period=2)])
    expected = _dit_latents(pipe)
    programs = pipe.transformer.programs
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    with pytest.raises(RuntimeError):  # the model itself refuses a latent of 3 channels: capture fails
        pipe.transformer(torch.randn(2, 3, 8, 8), timestep=t, class_labels=torch.tensor([1, 2]))
    with pytest.raises(diffopt.runtime.denoiser.InputError, match="class_labels"):  # the program refuses
        pipe.transformer.denoiser(x, t, torch.tensor([1, 2, 3]))
    assert pipe.transformer.programs == programs
    assert _close(_dit_latents(pipe), expected, 0)
    pipe.transformer(x, timestep=t, class_labels=torch.tensor([1, 2]))  # a bare call after the refusals runs


class _Cancel(Exception):
    pass


def _cancel_at(step):
    def callback(pipe, index, timestep, kwargs):
        if index == step:
            raise _Cancel()
        return kwargs

    return callback


def test_cancel_then_img2img_equals_a_fresh_img2img_run():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = diffopt.enable(stable_diffusion_pipeline(), [BlockCachePass(period=2)])
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def img2img(target):
        out = target(
            **_text(),
            image=image,
            strength=0.6,
            guidance_scale=2.0,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(1),
            output_type="latent",
        )
        return torch.as_tensor(out.images)

    fresh_pipe = diffopt.enable(stable_diffusion_pipeline(), [BlockCachePass(period=2)])
    fresh = img2img(diffopt.enable(StableDiffusionImg2ImgPipeline(**fresh_pipe.components)))
    with pytest.raises(_Cancel):
        _sd_latents(pipe, steps=5, callback_on_step_end=_cancel_at(2))
    sibling = diffopt.enable(StableDiffusionImg2ImgPipeline(**pipe.components))  # shares the component
    assert sibling.unet is pipe.unet
    assert _close(img2img(sibling), fresh)


def test_a_run_abandoned_after_its_first_step_leaves_nothing_behind():
    pipe = diffopt.enable(dit_pipeline(), [FirstBlockCachePass(threshold=0.2)])
    expected = _dit_latents(diffopt.enable(dit_pipeline(), [FirstBlockCachePass(threshold=0.2)]))
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *args, **kwargs: (_ for _ in ()).throw(_Cancel())  # DiTPipeline has no callback
    with pytest.raises(_Cancel):
        _dit_latents(pipe)
    pipe.scheduler.step = step
    assert _close(_dit_latents(pipe), expected)


def test_many_one_step_calls_keep_a_bounded_number_of_streams():
    pipe = diffopt.enable(dit_pipeline(), [BlockCachePass(period=2)])
    for _ in range(100):
        _dit_latents(pipe, steps=1)
    denoiser = pipe.transformer.denoiser
    assert denoiser.active_streams == 0  # released after each pipeline call
    assert len(denoiser.run_history()) <= 64
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2])
    for _ in range(100):  # a bare loop calling at one timestep: automatic streams, bounded
        pipe.transformer(x, timestep=t, class_labels=labels)
        assert denoiser.active_streams <= MAX_STREAMS
    for index in range(100):  # named streams, bounded
        with pipe.transformer.cache_context(f"branch{index}", step_index=index):
            pipe.transformer(x, timestep=t, class_labels=labels)
    assert denoiser.active_streams <= 2 * MAX_STREAMS


def test_save_pretrained_saves_the_model_and_loads_back(tmp_path):
    from diffusers import DiTPipeline

    pipe = diffopt.enable(dit_pipeline(), [BlockCachePass(period=2)])
    expected = _dit_latents(dit_pipeline())
    _dit_latents(pipe)
    assert list(pipe.config["transformer"]) == ["diffusers", "DiTTransformer2DModel"]
    pipe.save_pretrained(tmp_path)
    assert isinstance(pipe.transformer, OptimizedComponent)  # still enabled
    loaded = DiTPipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer).__name__ == "DiTTransformer2DModel"
    assert _close(_dit_latents(loaded), expected)


def test_deepcopy_of_an_enabled_pipeline_runs_on_its_own():
    pipe = diffopt.enable(dit_pipeline(), [BlockCachePass(period=2)])
    first = _dit_latents(pipe)
    twin = copy.deepcopy(pipe)
    assert (
        isinstance(twin.transformer, OptimizedComponent) and twin.transformer.original is not pipe.transformer.original
    )
    assert _close(_dit_latents(twin), first, 0)
    with torch.no_grad():
        twin.transformer.original.pos_embed.proj.weight.mul_(0.5)  # an in-place edit: the twin recaptures
    assert not _close(_dit_latents(twin), first)
    assert _close(_dit_latents(pipe), first, 0)  # the original is untouched


def test_model_methods_and_attributes_pass_through_and_changes_recapture():
    from diffusers.models.attention_processor import AttnProcessor

    pipe = stable_diffusion_pipeline()
    expected = _sd_latents(pipe)
    diffopt.enable(pipe)
    assert _close(_sd_latents(pipe), expected)
    unet = pipe.unet
    assert unet.conv_in is unet.original.conv_in and unet.time_embedding is unet.original.time_embedding
    unet.set_attn_processor(AttnProcessor())  # the model's own method; the program is captured again
    assert _close(_sd_latents(pipe), expected) and len(unet.programs) == 1
    unet.fuse_qkv_projections()
    assert _close(_sd_latents(pipe), expected, 1e-4)
    assert unet.state_dict().keys() == unet.original.state_dict().keys()


def test_a_lora_scale_change_recaptures():
    pytest.importorskip("peft")
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from models import diffusers_sd3
    from peft import LoraConfig

    encoders = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    pipe = StableDiffusion3Pipeline(
        transformer=diffusers_sd3(seed=1), scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(4), **encoders
    )
    pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))

    def latents(scale):
        out = pipe(
            prompt_embeds=_embeddings(2, 5, 16, seed=1),
            pooled_prompt_embeds=_embeddings(2, 8, seed=2),
            guidance_scale=1.0,
            height=8,
            width=8,
            num_inference_steps=3,
            joint_attention_kwargs={"scale": scale},
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
        return torch.as_tensor(out.images)

    expected = {scale: latents(scale) for scale in (0.0, 1.0)}
    assert not _close(expected[0.0], expected[1.0])
    diffopt.enable(pipe)
    for scale in (0.0, 1.0, 0.0):
        assert _close(latents(scale), expected[scale])
    assert len(pipe.transformer.programs) == 2  # one per scale
    pipe.transformer.disable_adapters()  # peft's adapter switch: every program is dropped and captured again
    assert _close(latents(1.0), expected[0.0])
    assert len(pipe.transformer.programs) == 1


def test_two_threads_making_the_first_call():
    shared = diffusers_dit(seed=1, num_layers=3)
    from diffusers import DDIMScheduler, DiTPipeline

    expected = _dit_latents(dit_pipeline())
    pipes = [
        diffopt.enable(DiTPipeline(transformer=shared, vae=tiny_vae(1), scheduler=DDIMScheduler()), [])
        for _ in range(2)
    ]
    same_pipe = diffopt.enable(dit_pipeline(), [])
    results, errors = {}, []

    def run(name, pipe):
        try:
            results[name] = _dit_latents(pipe)
        except Exception as error:  # noqa: BLE001 - collected and reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(f"shared{i}", p)) for i, p in enumerate(pipes)]
    threads += [threading.Thread(target=run, args=(f"same{i}", same_pipe)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(results) == 4 and all(_close(r, expected) for r in results.values())
    assert len(same_pipe.transformer.programs) == 1  # captured once


def test_pass_settings_are_checked_when_enabling():
    with pytest.raises(ValueError, match=r"FirstBlockCachePass: .*use BlockCachePass\(\)"):
        diffopt.enable(
            stable_diffusion_pipeline(), [FirstBlockCachePass(threshold=0.1)]
        )  # a UNet has no single residual chain
    with pytest.raises(ValueError, match=r"ForecastCachePass: no chain of blocks named \['transformer_block'\]"):
        diffopt.enable(dit_pipeline(), [ForecastCachePass(container="transformer_block")])
    with pytest.raises(ValueError, match=r"BlockCachePass: blocks \['transformer_blocks.9'\] are not in"):
        diffopt.enable(dit_pipeline(), [BlockCachePass(blocks=("transformer_blocks.9",))])
    with pytest.raises(ValueError, match="backend must be one of"):
        diffopt.enable(dit_pipeline(), backend="tensorrt-please")
    pipe = dit_pipeline()
    with pytest.raises(ValueError):
        diffopt.enable(pipe, [ForecastCachePass(container="nope")])
    assert not isinstance(pipe.transformer, OptimizedComponent)  # a refused enable changes nothing


def test_summary_reports_each_run_and_stream():
    pipe = diffopt.enable(dit_pipeline(), [BlockCachePass(period=2)])
    _dit_latents(pipe, steps=4)
    _dit_latents(pipe, steps=3)
    report = diffopt.summary(pipe)
    assert [r.variants for r in report.runs] == [("full", "cached") * 2, ("full", "cached", "full")]
    assert [r.stream for r in report.runs] == ["default", "default"]
    assert 0.3 < report.runs[0].work_saved < 0.5  # half the steps skip most of three blocks
    assert "full 2, cached 2" in str(report)
    with pytest.raises(ValueError, match="not enabled"):
        diffopt.summary(dit_pipeline())


def test_enable_with_the_compiled_backend_compiles_each_variant_once():
    import torch._dynamo.utils as dynamo_utils

    passes = [ForecastCachePass(order=1, period=2)]  # its `times` state came back with other strides
    eager = _dit_latents(diffopt.enable(dit_pipeline(), passes), steps=5)
    pipe = diffopt.enable(dit_pipeline(), passes, backend="compiled")
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    _dit_latents(pipe, steps=6)
    assert _close(_dit_latents(pipe, steps=5), eager, 1e-4)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 2  # full and forecast, once each
