"""``diffopt.serving`` on Ray Serve: a local Ray instance on this machine (2 CPUs, localhost
only) serves a tiny exported bundle over HTTP; started once for the file, stopped at its end."""

import base64
import io
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from models import simple_dit

from diffopt import capture, optimize
from diffopt.export.onnx import to_onnx
from diffopt.passes.block_cache import BlockCachePass
from diffopt.runtime.onnxruntime_backend import load_bundle
from diffopt.runtime.schedulers import make_scheduler
from diffopt.sampling.sequential import Sampler
from diffopt.serving.http import ServingError, post_sample

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("onnxruntime")

CONFIG = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2", "clip_sample": 1.0}
SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, bundle directory) of a one-replica deployment of a block-cached tiny DiT."""
    from diffopt.serving.deployment import deployment

    bundle = tmp_path_factory.mktemp("serving") / "bundle"
    graph = capture(simple_dit(), (torch.randn(2, *SHAPE), torch.tensor([999, 5]), torch.tensor([0, 1])))
    to_onnx(optimize(graph, [BlockCachePass(period=2)]), bundle, scheduler_config=CONFIG)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(str(bundle), max_batch=8, max_waiting=32, threads=1), route_prefix="/")
        yield f"http://127.0.0.1:{port}", bundle
    finally:
        serve.shutdown()
        ray.shutdown()


def _solo(bundle, labels, steps, seed):
    sampler = Sampler(make_scheduler(CONFIG, num_steps=steps), progress=False)
    return sampler.sample(
        load_bundle(bundle, threads=1), (torch.tensor(labels),), shape=(len(labels), *SHAPE), seed=seed
    )


def _concurrently(url, payloads, retries=8):
    """Each payload posted from its own thread; (result or ServingError) per payload."""
    results = [None] * len(payloads)

    def post(index):
        try:
            results[index] = post_sample(f"{url}/sample", payloads[index], retries=retries)
        except ServingError as error:
            results[index] = error

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def _health(url):
    with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
        return json.loads(response.read())


def test_http_samples_equal_solo_sampling(server):
    url, bundle = server
    payloads = [{"class_labels": [i % 10, (i + 3) % 10], "seed": i, "steps": 3 + i % 4} for i in range(6)]
    for payload, (sample, headers) in zip(payloads, _concurrently(url, payloads)):
        expected = _solo(bundle, payload["class_labels"], payload["steps"], payload["seed"])
        np.testing.assert_allclose(sample, expected.numpy(), rtol=1e-5, atol=1e-5)
        assert headers["x-diffopt-variants"].split(",")[:2] == ["full", "cached"]
    request = urllib.request.Request(
        f"{url}/sample", data=json.dumps({"class_labels": [1], "steps": 2, "format": "png"}).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "image/png" and response.read()[:4] == b"\x89PNG"
    assert _health(url)["status"] == "ok"


def _npy(array) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"class_labels": [1], "steps": 4, "colour": "red"}, "unknown fields ['colour']"),
        ({"class_labels": [1.5], "steps": 4}, "class_labels: a non-empty list of ints"),
        ({"conditions": {"y": _npy(np.array([[1, 2]]))}, "steps": 4}, "y: expected shape [1], found [1, 2]"),
        ({"conditions": {"y": _npy(np.array([1.0]))}, "steps": 4}, "y: expected int64, found float64"),
        ({"conditions": {"y": "not base64!"}, "steps": 4}, "conditions.y: not a base64 .npy array"),
        ({"class_labels": [1], "steps": 10**6}, "steps: an int in [1, 1000]"),
        ({"class_labels": [1], "steps": 4, "guidance_scale": float("nan")}, "guidance_scale: a finite number"),
        ({"class_labels": [11], "steps": 4}, "y: values must be in [0, 10]"),
    ],
)
def test_malformed_requests_get_400_naming_the_field_and_do_not_disturb_others(server, payload, field):
    url, bundle = server
    good = {"class_labels": [4, 5], "seed": 7, "steps": 6}
    results = _concurrently(url, [good, payload, good])
    assert isinstance(results[1], ServingError) and "HTTP 400" in str(results[1]) and field in str(results[1])
    expected = _solo(bundle, good["class_labels"], good["steps"], good["seed"]).numpy()
    for sample, _ in (results[0], results[2]):
        np.testing.assert_allclose(sample, expected, rtol=1e-5, atol=1e-5)


def test_a_replica_killed_mid_load_loses_no_request(server):
    url, bundle = server
    payloads = [{"class_labels": [i % 10], "seed": 100 + i, "steps": 400} for i in range(6)]
    results = [None]

    def load():
        results[0] = _concurrently(url, payloads)

    thread = threading.Thread(target=load)
    thread.start()
    deadline = time.monotonic() + 60
    while (health := _health(url))["active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["active"] > 0, "the load never reached the replica"
    os.kill(health["pid"], signal.SIGKILL)  # the replica process, with requests in flight
    thread.join(timeout=400)
    assert not thread.is_alive()
    for payload, result in zip(payloads, results[0]):
        assert not isinstance(result, ServingError), f"request {payload['seed']} ended without a sample: {result}"
        expected = _solo(bundle, payload["class_labels"], payload["steps"], payload["seed"]).numpy()
        np.testing.assert_allclose(result[0], expected, rtol=1e-5, atol=1e-5)
    assert _health(url)["pid"] != health["pid"]  # Ray Serve started another replica


def test_a_program_from_python_is_served_like_a_bundle(server):
    from diffopt.serving.deployment import deployment

    url, bundle = server
    graph = capture(simple_dit(), (torch.randn(2, *SHAPE), torch.tensor([999, 5]), torch.tensor([0, 1])))
    program = optimize(graph, [BlockCachePass(period=2)])  # pickled to the replica
    serve.run(deployment(program, scheduler_config=CONFIG, threads=1), name="program", route_prefix="/program")
    try:
        sample, headers = post_sample(f"{url}/program/sample", {"class_labels": [2, 8], "seed": 5, "steps": 4})
    finally:
        serve.delete("program")
    np.testing.assert_allclose(sample, _solo(bundle, [2, 8], 4, 5).numpy(), rtol=1e-5, atol=1e-5)


def test_serve_refuses_a_directory_that_is_no_bundle_before_starting_ray(tmp_path, capsys):
    from diffopt.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path)])
    assert exit_.value.code == 2 and str(tmp_path) in capsys.readouterr().err
