"""Outside review, the rest: bundles know what they belong to, families that failed (Chroma
captures, Lumina2 is refused by name, exports verify on the captured call's inputs), and the
smaller items (a single pass, forecast orders, plain-dict scheduler configs, quiet exports,
variant names in messages, bare loops warned and scoped)."""

import json
import logging
import warnings

import pytest
import torch
from models import simple_dit, tiny_vae
from test_pipelines import CASES, _text

import diffopt
from diffopt import capture, optimize
from diffopt.export.onnx import ExportError, to_onnx
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.runtime.bundle import CHECKSUMS_NAME, sha256_of
from diffopt.runtime.denoiser import InputError

pytest.importorskip("onnxruntime")

DIT_CALL = {"class_labels": [1, 2], "guidance_scale": 1.0}
SD_CALL = {**_text(16), "height": 8, "width": 8, "guidance_scale": 2.0}


def _latents(pipe, call, steps=4):
    out = pipe(**call, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")
    return torch.as_tensor(out.images)


def _exported(build, call, directory):
    pipe = diffopt.enable(build(), [BlockCachePass(period=2)])
    _latents(pipe, call)
    diffopt.export_pipeline(pipe, directory)
    return directory


def test_a_bundle_from_other_weights_is_refused_unless_allowed(tmp_path):
    bundle = _exported(CASES["DiTPipeline"].build, DIT_CALL, tmp_path / "bundle")
    other = CASES["DiTPipeline"].build()
    with torch.no_grad():
        other.transformer.proj_out_2.weight.add_(1.0)  # the user's fine-tuned weights
    with pytest.raises(ValueError, match="exported from other weights or config than this pipeline's"):
        diffopt.enable(other, bundle=bundle, threads=1)
    pipe = diffopt.enable(other, bundle=bundle, threads=1, allow_other_weights=True)
    assert _latents(pipe, DIT_CALL).shape[0] == 2
    same = diffopt.enable(CASES["DiTPipeline"].build(), bundle=bundle, threads=1)  # same weights: accepted
    assert _latents(same, DIT_CALL).shape[0] == 2


@pytest.mark.parametrize("output_type", ["builtins:dict", "os:getenv", "no_colon", 7])
def test_a_recorded_output_type_that_is_no_model_output_is_refused_at_load(tmp_path, output_type):
    bundle = _exported(CASES["DiTPipeline"].build, DIT_CALL, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["call"]["output_type"] = output_type
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    listed = [line.split()[1] for line in (bundle / CHECKSUMS_NAME).read_text().splitlines()]
    (bundle / CHECKSUMS_NAME).write_text("".join(f"{sha256_of(bundle / n)}  {n}\n" for n in listed))  # re-summed
    with pytest.raises(ValueError, match="output.type"):
        diffopt.enable(CASES["DiTPipeline"].build(), bundle=bundle, threads=1)


def test_a_bundle_called_at_another_resolution_says_how_to_export_one(tmp_path):
    build = CASES["StableDiffusionPipeline"].build
    bundle = _exported(build, SD_CALL, tmp_path / "bundle")
    pipe = diffopt.enable(build(), bundle=bundle, threads=1)
    with pytest.raises(InputError, match=r"holds one resolution.*Export another bundle for this resolution"):
        _latents(pipe, {**SD_CALL, "height": 16, "width": 16})


class _PositiveScale(torch.nn.Module):
    """A denoiser that is finite only for a positive ``scale`` condition (random inputs are not)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, t, scale):
        return self.proj(x) * torch.log(scale)[:, None] + t[:, None]


def test_export_verifies_on_example_inputs_and_names_the_inputs_when_made_up_ones_fail(tmp_path):
    example = (torch.randn(2, 4), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0]))
    program = optimize(capture(_PositiveScale(), example), [])
    with pytest.raises(ExportError, match=r"non-finite values on random inputs .*\(x, t, scale\).*example_inputs="):
        to_onnx(program, tmp_path / "made-up")
    assert not (tmp_path / "made-up").exists()
    to_onnx(program, tmp_path / "bundle", example_inputs=(example[0][:1], example[1][:1], example[2][:1]))
    assert (tmp_path / "bundle" / "manifest.json").exists()


def _chroma():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(1)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(1),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )


def _text_with_mask(width, mask_dtype):
    generator = torch.Generator().manual_seed(3)
    embeddings = {name: torch.randn(1, 5, width, generator=generator) for name in ("prompt", "negative_prompt")}
    return {
        "prompt_embeds": embeddings["prompt"],
        "negative_prompt_embeds": embeddings["negative_prompt"],
        "prompt_attention_mask": torch.ones(1, 5, dtype=mask_dtype),
        "negative_prompt_attention_mask": torch.ones(1, 5, dtype=mask_dtype),
    }


def test_chroma_captures_bit_exact_and_caches():
    """Chroma makes the batch size a Python list (``torch.tensor([0] * batch_size)``) and, at one
    image token, its img_ids look batched: it is captured for its batch size."""
    call = {**_text_with_mask(16, torch.bool), "height": 16, "width": 16, "guidance_scale": 2.0}
    pipe = _chroma()
    expected = _latents(pipe, call)
    diffopt.enable(pipe)
    assert torch.equal(_latents(pipe, call), expected)
    diffopt.disable(pipe)
    diffopt.enable(pipe, [BlockCachePass(period=2)])
    cached = _latents(pipe, call)
    assert diffopt.summary(pipe).runs[-1].variants[:2] == ("full", "cached")
    assert 0 < float((cached - expected).abs().max()) < 1.0


def test_lumina2_is_refused_by_name_with_the_reason():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(1)
    transformer = Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(2, 2, 4),
        axes_lens=(32, 32, 32),
        cap_feat_dim=16,
    ).eval()
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
    )
    with pytest.raises(ValueError, match=r"cannot capture Lumina2Transformer2DModel: its forward reads the text mask"):
        diffopt.enable(pipe)


def test_a_single_pass_where_a_list_belongs_says_what_to_write():
    with pytest.raises(TypeError, match=r"found one pass: write passes=\[FirstBlockCachePass"):
        diffopt.enable(CASES["DiTPipeline"].build(), passes=FirstBlockCachePass(0.1))
    graph = capture(simple_dit(), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
    with pytest.raises(TypeError, match="found one pass"):
        optimize(graph, BlockCachePass())


def test_a_forecast_order_past_the_limit_is_refused():
    with pytest.raises(ValueError, match="order must be at most 4, found 7"):
        ForecastCachePass(order=7, period=2)


def test_a_scheduler_config_copied_into_a_dict_runs_as_its_scheduler():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    for scheduler in (DDIMScheduler(), FlowMatchEulerDiscreteScheduler(shift=3.0)):
        from_dict = diffopt.make_scheduler(dict(scheduler.config), num_steps=5)
        from_object = diffopt.make_scheduler(scheduler, num_steps=5)
        assert from_dict.name == type(scheduler).__name__
        assert torch.equal(from_dict.timesteps, from_object.timesteps)


def test_export_writes_no_torchvision_warnings(tmp_path, capfd):
    graph = capture(simple_dit(), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
    to_onnx(optimize(graph, [BlockCachePass(period=2)]), tmp_path / "bundle")
    assert "torchvision" not in capfd.readouterr().err


def test_messages_name_variants_as_written():
    from diffopt.ir.specs import FULL

    assert repr([FULL]) == "['full']" and f"{FULL!r}" == "'full'"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffopt")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        _latents(diffopt.enable(CASES["DiTPipeline"].build(), [BlockCachePass(period=2)]), DIT_CALL)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = "\n".join(record.getMessage() for record in records)
    assert "variants ['cached', 'full']" in text and "Role." not in text


def test_a_bare_loop_is_warned_once_and_a_run_scope_restarts_its_cache():
    """A run abandoned after step 0 and restarted at the same timestep: the timestep heuristics
    continue the old run (stale cache); ``run_scope`` starts each run fresh."""
    graph = capture(simple_dit(), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
    denoiser = optimize(graph, [BlockCachePass(period=2)])
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    fresh = denoiser.__class__(denoiser.program)  # no state yet
    with fresh.run_scope():
        expected = [fresh(x, torch.tensor([999, 999]), labels), fresh(x * 0.9, torch.tensor([979, 979]), labels)]
    with pytest.warns(UserWarning, match="outside a run scope"):
        denoiser(x + 1, torch.tensor([999, 999]), labels)  # abandoned after step 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        for _ in range(2):
            with denoiser.run_scope():
                got = [
                    denoiser(x, torch.tensor([999, 999]), labels),
                    denoiser(x * 0.9, torch.tensor([979, 979]), labels),
                ]
            torch.testing.assert_close(got, expected)
