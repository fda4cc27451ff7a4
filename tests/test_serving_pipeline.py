"""Serving a diffusers pipeline without Ray: ``PipelineEngine`` (whole pipeline calls whose
denoiser forwards a ``ForwardBatcher`` shares) and the OpenAI images request parser. The Ray
Serve deployment of saved pipelines is tested in ``test_serving_ray.py``."""

import json
import threading

import numpy as np
import pytest
import torch
from models import dit_pipeline
from test_pipelines import _sd3

import diffopt
from diffopt.passes.block_cache import BlockCachePass
from diffopt.passes.temporal_difference import TemporalDifferencePass
from diffopt.serving.engine import Overloaded, RequestError
from diffopt.serving.images_api import parse_images_request
from diffopt.serving.pipeline_engine import PipelineEngine, call_parameters


def _sd3_call(index, tokens=5, steps=None):
    def embeddings(*shape, seed):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    return {
        "prompt_embeds": embeddings(1, tokens, 16, seed=index),
        "pooled_prompt_embeds": embeddings(1, 8, seed=10 + index),
        "negative_prompt_embeds": embeddings(1, tokens, 16, seed=20 + index),
        "negative_pooled_prompt_embeds": embeddings(1, 8, seed=30 + index),
        "height": 8,
        "width": 8,
        "guidance_scale": 2.0 if index % 2 else 1.0,
        "num_inference_steps": steps or 3 + index,
        "output_type": "np",
    }


def _served_and_solo(passes, calls):
    """(engine results, solo images) of ``calls`` (seed = index) on one enabled pipeline."""
    pipe = diffopt.enable(_sd3(), passes)
    pipe.set_progress_bar_config(disable=True)
    solo = [pipe(**call, generator=torch.Generator().manual_seed(i)).images for i, call in enumerate(calls)]
    engine = PipelineEngine(pipe, max_batch=16)
    try:
        futures = [engine.submit(call, seed=i) for i, call in enumerate(calls)]
        return [future.result(timeout=120) for future in futures], solo, engine
    finally:
        engine.close()


def _rows(call):
    return 2 if call["guidance_scale"] > 1 else 1


def test_requests_share_forwards_but_another_prompt_length_never_joins_them():
    calls = [_sd3_call(i) for i in range(4)] + [_sd3_call(4, tokens=7)]
    results, solo, engine = _served_and_solo([BlockCachePass(period=2)], calls)
    for result, expected in zip(results, solo):
        np.testing.assert_allclose(result.images, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert max(rows for _, rows in engine.batcher.forwards) > 2, "no forward held more than one request"
    assert set(results[4].batch_rows) == {_rows(calls[4])}  # the 7-token request ran its own program alone


def test_a_program_that_quantizes_per_batch_runs_each_request_alone():
    calls = [_sd3_call(i, steps=3) for i in range(3)]
    results, solo, _ = _served_and_solo([TemporalDifferencePass("dynamic")], calls)
    for call, result, expected in zip(calls, results, solo):
        assert set(result.batch_rows) == {_rows(call)}
        np.testing.assert_allclose(result.images, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_the_engine_is_bounded_and_names_what_the_pipeline_does_not_take():
    pipe = diffopt.enable(_sd3(), [])
    engine = PipelineEngine(pipe, max_active=1, max_waiting=1)
    started = threading.Event()
    release = threading.Event()
    original = type(pipe.vae).decode

    def held_decode(vae, *args, **kwargs):  # the running request waits here until the test lets it go
        started.set()
        release.wait(timeout=60)
        return original(vae, *args, **kwargs)

    try:
        type(pipe.vae).decode = held_decode
        running = engine.submit(_sd3_call(0, steps=1), seed=0)
        assert started.wait(timeout=60)
        waiting = engine.submit(_sd3_call(1, steps=1), seed=1)
        with pytest.raises(Overloaded, match="max_active=1, max_waiting=1"):
            engine.submit(_sd3_call(2, steps=1), seed=2)
        release.set()
        assert running.result(timeout=60).images.shape == (1, 8, 8, 3) and waiting.result(timeout=60)
        with pytest.raises(RequestError, match="colour: not an argument") as error:
            engine.submit({"colour": "red"}, seed=0)
        assert error.value.param == "colour"
    finally:
        type(pipe.vae).decode = original
        engine.close()
    with pytest.raises(ValueError, match="is not enabled"):
        PipelineEngine(_sd3())


def _parse(payload, pipe):
    return parse_images_request(json.dumps(payload).encode(), call_parameters(pipe), getattr(pipe, "labels", None))


def test_a_class_conditional_pipeline_takes_its_class_as_the_prompt():
    pipe = dit_pipeline()
    request = _parse({"prompt": "3", "n": 2, "seed": 5, "num_inference_steps": 4}, pipe)
    assert request.call == {"output_type": "np", "class_labels": [3, 3], "num_inference_steps": 4}
    assert request.seed == 5
    for payload, param in (({"prompt": "a cat"}, "prompt"), ({"prompt": "3", "size": "8x8"}, "size")):
        with pytest.raises(RequestError) as error:
            _parse(payload, pipe)
        assert error.value.param == param


def test_openai_fields_map_onto_a_prompt_pipelines_call():
    pipe = _sd3()
    request = _parse(
        {"model": "any", "prompt": "a cat", "n": 2, "size": "16x8", "guidance_scale": 3, "negative_prompt": "blur"},
        pipe,
    )
    assert request.call == {
        "output_type": "np",
        "prompt": "a cat",
        "num_images_per_prompt": 2,
        "width": 16,
        "height": 8,
        "guidance_scale": 3.0,
        "negative_prompt": "blur",
    }
    assert 0 <= request.seed < 2**63 and request.output_format == "png"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--pipeline", "{saved}", "--passes", "{passes}", "--bundle", "b"], "--passes or --bundle, not both"),
        (["serve", "{saved}", "--passes", "{passes}"], "go with --pipeline DIR"),
        (["serve", "--pipeline", "{tmp}"], "no model_index.json"),
        (["serve", "--pipeline", "{saved}", "--passes", "{tmp}/missing.json"], "--passes"),
        (["serve", "--pipeline", "{saved}", "--call-defaults", "[1]"], "--call-defaults: a JSON object"),
    ],
)
def test_serve_refuses_pipeline_options_that_cannot_work_before_starting_ray(argv, message, tmp_path, capsys):
    from diffopt.cli import main
    from diffopt.passes.registry import save_passes

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "model_index.json").write_text("{}")
    passes = save_passes(tmp_path / "p.passes.json", [BlockCachePass(period=2)])
    values = {"saved": saved, "passes": passes, "tmp": tmp_path}
    with pytest.raises(SystemExit) as exit_:
        main([part.format(**values) for part in argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_slo_admission_starts_what_fits_holds_what_would_make_others_late_and_refuses_the_hopeless():
    import time

    from diffopt.serving.slo_admission import SloAdmission

    admission = SloAdmission(10.0)
    assert admission.seconds_per_step(1) is None  # no model before a request finished: requests start
    for rows in (1, 2, 4):
        admission.observe(rows, 0.01 * rows)  # finished requests: 0.01 s per step and row
    assert admission.seconds_per_step(3) == pytest.approx(0.03)
    started = threading.Event()

    def short():  # 100 steps fit beside the long one (2 s), but would make it late: 600 x 0.02 s > 10 s
        with admission.slot(time.monotonic(), steps=100):
            started.set()

    with admission.slot(time.monotonic(), steps=600) as long:  # 6 s alone: in time
        assert long.remaining == 600
        with pytest.raises(Overloaded, match="would not finish within the SLO"):
            admission.slot(time.monotonic(), steps=2000).__enter__()  # 2000 x 0.01 s > 10 s even alone
        assert admission.refused == 1
        thread = threading.Thread(target=short)
        thread.start()
        assert not started.wait(timeout=0.3)  # held while the long one runs
    assert started.wait(timeout=5)  # started once the long one finished
    thread.join(timeout=5)
    with admission.slot(time.monotonic(), steps=2000):  # an idle engine starts anything
        pass


def test_the_slo_cost_model_leaves_out_a_run_that_captured_its_program():
    from diffopt.serving.slo_admission import SloAdmission

    admission = SloAdmission(1.0)
    admission.observe(1, 5.0)  # the first request captured the program: 5 s per step
    for rows in (1, 2, 2, 4):
        admission.observe(rows, 0.01 * rows)
    assert admission.seconds_per_step(2) == pytest.approx(0.02)
