"""Fault injection: corrupt bundles, killed and refused exports, shared runs, bad inputs and
parameters. Each case expects a clear diffopt error that names the input, file or field,
and checks that nothing was lost."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from models import simple_dit

from diffopt import PassError, Sampler, StateError, calibrate, capture, make_scheduler, optimize
from diffopt.cli import main
from diffopt.export import to_onnx
from diffopt.export.onnx import ExportError
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.passes.temporal_difference import TemporalDifferencePass
from diffopt.runtime.bundle import CHECKSUMS_NAME, MANIFEST_NAME, BundleError, Manifest, sha256_of
from diffopt.runtime.denoiser import InputError
from diffopt.runtime.runtimes import load_bundle
from diffopt.sampling.speculative import SpeculativeDDPMSampler

pytest.importorskip("onnxruntime")
DDPM = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}
LABELS = torch.tensor([1, 4, 7])
SHAPE = (3, 1, 16, 16)
EXAMPLE = (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1]))


@pytest.fixture(scope="module")
def graph():
    return capture(simple_dit(seed=8), EXAMPLE)


@pytest.fixture(scope="module")
def cached(graph):
    return optimize(graph, [BlockCachePass(period=2)])


@pytest.fixture(scope="module")
def pristine(cached, tmp_path_factory):
    """A bundle of the block-cached tiny DiT, exported once; tests work on copies."""
    directory = tmp_path_factory.mktemp("pristine") / "bundle"
    to_onnx(cached, directory, scheduler_config=DDPM)
    return directory


@pytest.fixture
def bundle(pristine, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(pristine, copy)
    return copy


def _digests(directory: Path) -> dict[str, str]:
    return {path.name: sha256_of(path) for path in sorted(directory.iterdir())}


def _sample(denoiser, seed=0, steps=6):
    return Sampler(make_scheduler(DDPM, num_steps=steps), progress=False).sample(
        denoiser, (LABELS,), shape=SHAPE, seed=seed
    )


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def _edit_manifest(directory: Path, edit) -> None:
    data = json.loads((directory / MANIFEST_NAME).read_text())
    edit(data)
    (directory / MANIFEST_NAME).write_text(json.dumps(data))


# --- bundles: integrity, schema, consistency ------------------------------------------------------------


def _files(pristine):
    return sorted(path.name for path in pristine.iterdir())


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_a_flipped_byte_anywhere_in_a_bundle_is_detected_at_load(pristine, tmp_path, where):
    for name in _files(pristine):
        copy = tmp_path / f"{name}-{where}"
        shutil.copytree(pristine, copy)
        data = bytearray((copy / name).read_bytes())
        data[int(where * (len(data) - 1))] ^= 0x5A
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=rf"bundle {copy}"):
            load_bundle(copy)


def test_missing_files_and_checksums_are_reported(bundle):
    (bundle / "weights.bin").unlink()
    with pytest.raises(BundleError, match="weights.bin is missing"):
        load_bundle(bundle)
    (bundle / CHECKSUMS_NAME).unlink()
    with pytest.raises(BundleError, match=f"no {CHECKSUMS_NAME}"):
        load_bundle(bundle)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_bundle(bundle / "nowhere")


def test_checksums_can_be_skipped_for_huge_bundles(bundle, cached):
    (bundle / CHECKSUMS_NAME).unlink()
    samples = _sample(load_bundle(bundle, verify_checksums=False))
    assert _relative(samples, _sample(cached)) < 1e-5


SCHEMA_FAULTS = {
    "missing field": (lambda d: d.pop("signature"), "field 'signature' is missing"),
    "wrong type": (lambda d: d.update(state={"a": 1}), "field 'state': expected list"),
    "bad dtype": (lambda d: d["state"][0].update(dtype="bogus"), "field 'state'"),
    "bad shape": (lambda d: d["state"][0].update(shape=["batch", -4]), "field 'state'"),
    "unknown schedule": (lambda d: d["schedule"].update(kind="random"), "field 'schedule'"),
    "schedule without its variant": (lambda d: d["variants"].pop("cached"), "field 'schedule' uses variants"),
    "file outside the bundle": (lambda d: d["variants"]["full"].update(file="../full.onnx"), "variants"),
    "profile": (lambda d: d.update(profile="coreml"), "field 'profile'"),
    "version": (lambda d: d.update(format_version=1), "version 3"),
    "scheduler config": (lambda d: d["scheduler"].update(beta_schedule="cubic"), "field 'scheduler'"),
    "not an object": (lambda d: d.clear() or d.update(variants=[]), "field"),
    "state disagrees with the graphs' inputs": (
        lambda d: d["state"][0].update(dtype="float16"),
        r"field variants\.\w+\.inputs: state tensors",
    ),
}


@pytest.mark.parametrize("fault", SCHEMA_FAULTS, ids=list(SCHEMA_FAULTS))
def test_manifest_faults_name_the_bundle_file_and_field(bundle, fault):
    edit, message = SCHEMA_FAULTS[fault]
    _edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=f"{MANIFEST_NAME} changed after export"):
        load_bundle(bundle)  # checksums catch every edit first
    with pytest.raises(BundleError, match=message) as raised:
        load_bundle(bundle, verify_checksums=False)
    assert str(bundle) in str(raised.value)


def test_invalid_json_is_a_bundle_error(bundle):
    (bundle / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle, verify_checksums=False)


@pytest.mark.parametrize("dtype", ["float16", "int8", "float64"])
def test_a_manifest_whose_state_dtype_disagrees_with_the_graphs_is_refused_not_run(bundle, dtype):
    """Was: rc 139 (munmap_chunk) for float16 / int8, silently wrong samples for float64."""

    def edit(data):  # a consistent edit of the manifest: only the graphs disagree
        for entry in data["state"]:
            entry["dtype"] = dtype
        for variant in data["variants"].values():
            for spec in variant["inputs"][3:] + variant["outputs"][1:]:
                spec["dtype"] = dtype

    _edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=rf"is float32 .* in the graph but {dtype}"):
        load_bundle(bundle, verify_checksums=False)


# --- export: atomic, nothing lost -------------------------------------------------------------------------


def test_a_refused_export_leaves_the_previous_bundle_unchanged(bundle, graph):
    before = _digests(bundle)
    statistics = calibrate(
        optimize(graph).program,
        Sampler(make_scheduler(DDPM, num_steps=3), progress=False),
        (LABELS,),
        SHAPE,
        progress=False,
    )
    integer = optimize(graph, [TemporalDifferencePass("integer")], calibration=statistics)
    with pytest.raises(ExportError, match="float64"):
        to_onnx(integer, bundle)  # exact integer emulation does not export
    with pytest.raises(ValueError, match="unknown export profile"):
        to_onnx(integer, bundle, profile="coreml")
    with pytest.raises(ValueError, match="export_batch"):
        to_onnx(integer, bundle, export_batch=0)
    assert _digests(bundle) == before
    load_bundle(bundle)
    assert not [p for p in bundle.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_export_refuses_a_directory_with_other_files(cached, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"holds no loadable diffopt bundle .*\['notes.txt'\] are left alone"):
        to_onnx(cached, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is not a directory"):
        to_onnx(cached, tmp_path / "file")


def test_export_replaces_a_bundle_only_when_the_new_one_is_complete(bundle, graph):
    icc = optimize(graph, [IncrementCalibratedCachePass(rank=4, period=2)])
    manifest = to_onnx(icc, bundle)
    assert set(manifest.variants) == {"full", "calibrated"}
    assert set(Manifest.load(bundle).variants) == {"full", "calibrated"}
    assert not (bundle / "cached.onnx").exists()  # the old bundle's files went with it
    assert _relative(_sample(load_bundle(bundle)), _sample(icc)) < 1e-5


def test_a_killed_export_leaves_the_previous_bundle_loadable_and_unchanged(bundle, tmp_path):
    before = _digests(bundle)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from models import simple_dit
        from diffopt import capture, optimize
        from diffopt.export import to_onnx
        from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
        graph = capture(simple_dit(seed=9), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
        to_onnx(optimize(graph, [IncrementCalibratedCachePass(rank=4)]), {str(bundle)!r})
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            partial = [p for p in bundle.parent.iterdir() if ".partial-" in p.name]
            if partial and any(partial[0].glob("*.onnx")):
                break
            time.sleep(0.02)
        assert process.poll() is None, "the export finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert _digests(bundle) == before
    load_bundle(bundle)


# --- state: every run owns its state ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_two_threads_on_one_denoiser_equal_each_run_alone(cached, pristine, backend):
    denoiser = cached if backend == "torch" else load_bundle(pristine, threads=1)
    alone = {seed: _sample(denoiser, seed, steps=12) for seed in (0, 1)}
    results = {}

    def run(seed):
        results[seed] = _sample(denoiser, seed, steps=12)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (0, 1):
        assert torch.equal(results[seed], alone[seed])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_two_interleaved_functional_runs_equal_each_run_alone(cached, pristine, backend):
    denoiser = cached if backend == "torch" else load_bundle(pristine, threads=1)
    g = torch.Generator().manual_seed(3)
    trajectories = [
        [(torch.randn(SHAPE, generator=g), torch.full((3,), 999 - 100 * k)) for k in range(6)] for _ in range(2)
    ]

    def alone(trajectory):
        state, outs = denoiser.init_state(3), []
        for k, (x, t) in enumerate(trajectory):
            out, state = denoiser.step(k, x, t, LABELS, state=state)
            outs.append(out)
        return outs

    expected = [alone(trajectory) for trajectory in trajectories]
    states, outs = [denoiser.init_state(3), denoiser.init_state(3)], [[], []]
    for k in range(6):
        for run in (0, 1):
            x, t = trajectories[run][k]
            out, states[run] = denoiser.step(k, x, t, LABELS, state=states[run])
            outs[run].append(out)
    for run in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(outs[run], expected[run]))


def test_state_misuse_is_an_error(cached, graph):
    x, t = torch.randn(SHAPE), torch.full((3,), 500)
    fresh = cached.init_state(3)
    with pytest.raises(StateError, match="step 1 on a fresh state"):
        cached.step(1, x, t, LABELS, state=fresh)
    _, after_first = cached.step(0, x, t, LABELS, state=fresh)
    with pytest.raises(StateError, match="state after step 0"):
        cached.step(3, x, t, LABELS, state=after_first)
    other = optimize(graph, [BlockCachePass(period=3)])  # same state entries, another schedule
    with pytest.raises(StateError, match="belongs to a program with another state spec or schedule"):
        other.step(1, x, t, LABELS, state=after_first)
    with pytest.raises(StateError, match="batch size 2"):
        cached.step(0, x[:2], t[:2], LABELS[:2], state=fresh)


# --- inputs and parameters ------------------------------------------------------------------------------------

INPUT_FAULTS = {
    "float64 latent": (lambda x, t, c: (x.double() + 1e-9, t, c), "x: expected float32, found float64"),
    "latent rank": (lambda x, t, c: (x[:, 0], t, c), r"x: expected shape \(3, 1, 16, 16\)"),
    "latent size": (lambda x, t, c: (x[..., :8], t, c), r"x: expected shape \(3, 1, 16, 16\)"),
    "condition batch": (lambda x, t, c: (x, t, c[:2]), r"y: expected shape \(3,\)"),
    "fractional labels": (lambda x, t, c: (x, t, c.float() + 0.5), "y: expected int64"),
    "timestep shape": (lambda x, t, c: (x, t[:2], c), r"timestep: expected a scalar or shape \(3,\)"),
    "condition device": (lambda x, t, c: (x, t, c.to("meta")), "y: on meta"),
    "not a tensor": (lambda x, t, c: (x.tolist(), t, c), "x: expected a batched tensor"),
}


@pytest.mark.parametrize("fault", INPUT_FAULTS, ids=list(INPUT_FAULTS))
def test_bad_inputs_are_named_before_anything_runs(cached, pristine, fault):
    corrupt, message = INPUT_FAULTS[fault]
    x, t, c = corrupt(torch.randn(SHAPE), torch.full((3,), 500), LABELS)
    for denoiser in (cached, load_bundle(pristine, threads=1, verify_checksums=False)):
        with pytest.raises(InputError, match=message):
            denoiser.step(0, x, t, c, state=denoiser.init_state(3))
    with pytest.raises(InputError, match="expected conditions"):
        cached.step(0, torch.randn(SHAPE), torch.full((3,), 500), state=cached.init_state(3))
    with pytest.raises(InputError, match="not finite"):
        optimize(capture(simple_dit(seed=1), (EXAMPLE[0], EXAMPLE[1].float(), EXAMPLE[2]))).step(
            0, torch.randn(SHAPE), torch.full((3,), math.nan), LABELS
        )


PARAMETER_FAULTS = {
    "ICC fractional period": (lambda: IncrementCalibratedCachePass(period=2.5), "period must be an int >= 1"),
    "ICC blocks as a string": (lambda: IncrementCalibratedCachePass(blocks="transformer_blocks.1"), "tuple"),
    "ICC negative rank": (lambda: IncrementCalibratedCachePass(rank=-1), "rank must be an int >= 0"),
    "ICC NaN threshold": (lambda: IncrementCalibratedCachePass(refresh_threshold=math.nan), "refresh_threshold"),
    "block cache period 0": (lambda: BlockCachePass(period=0), "period must be an int >= 1"),
    "first-block NaN threshold": (lambda: FirstBlockCachePass(math.nan), "threshold must be a finite number"),
    "Ditto fractional refresh": (lambda: TemporalDifferencePass(refresh_period=1.5), "refresh_period"),
    "Ditto bits as text": (lambda: TemporalDifferencePass("difference", bits="8"), "bits"),
    "NaN guidance": (lambda: Sampler(make_scheduler(DDPM), guidance_scale=math.nan), "guidance_scale"),
    "fractional steps": (lambda: make_scheduler(DDPM, num_steps=2.5), "num_steps must be an int >= 1"),
    "too many steps": (lambda: make_scheduler(DDPM, num_steps=5000), "exceeds the 1000 training timesteps"),
    "zero samples": (
        lambda: Sampler(make_scheduler(DDPM), progress=False).sample(lambda x, t, c: x, (LABELS[:0],), shape=(0, 1)),
        "shape must be positive ints",
    ),
    "speculative zero samples": (
        lambda: SpeculativeDDPMSampler(torch.linspace(0.99, 0.01, 1000), 10, progress=False).sample(
            lambda x, t, c: x, shape=(0, 4)
        ),
        "SpeculativeDDPMSampler.sample: shape must be positive ints",
    ),
    "negative seed": (
        lambda: Sampler(make_scheduler(DDPM), progress=False).sample(lambda x, t, c: x, shape=(1, 1), seed=-1),
        "seed must be an int >= 0",
    ),
}


@pytest.mark.parametrize("fault", PARAMETER_FAULTS, ids=list(PARAMETER_FAULTS))
def test_bad_parameters_are_refused_with_their_name(fault):
    make, message = PARAMETER_FAULTS[fault]
    with pytest.raises(ValueError, match=message):
        make()


def test_passes_that_cannot_apply_say_why(graph):
    first_block = optimize(graph, [FirstBlockCachePass(0.1)]).program
    with pytest.raises(PassError, match="BlockCachePass cannot apply: the program already has cache variants"):
        optimize(first_block, [BlockCachePass()])
    icc = optimize(graph, [IncrementCalibratedCachePass(rank=4)]).program
    with pytest.raises(PassError, match="already has cache variants from IncrementCalibratedCachePass"):
        optimize(icc, [IncrementCalibratedCachePass(rank=8)])
    exact = optimize(graph, [TemporalDifferencePass("exact")]).program
    with pytest.raises(PassError, match="already has temporal-difference variants"):
        optimize(exact, [TemporalDifferencePass("dynamic")])


CLI_FAULTS = {
    "sample zero samples": (["sample", "{bundle}", "--samples", "0"], "--samples must be >= 1"),
    "sample into a missing directory": (["sample", "{bundle}", "--out", "{tmp}/no/such/x.png"], "does not exist"),
    "calibrate zero samples": (["calibrate", "dit-digits", "--samples", "0"], "--samples must be >= 1"),
    "calibrate one step": (["calibrate", "dit-digits", "--steps", "1"], "--steps must be >= 2"),
    "calibrate into a missing directory": (["calibrate", "dit-digits", "--out", "{tmp}/no/x.json"], "does not exist"),
    "export into a missing parent": (["export", "dit-digits", "{tmp}/no/such/bundle"], "does not exist"),
    "export int8-static uncalibrated": (
        ["export", "dit-digits", "{tmp}/b", "--precision", "int8-static"],
        "needs --calibration",
    ),
    "float layers without int8-static": (["export", "dit-digits", "{tmp}/b", "--float-layers", "2"], "--float-layers"),
    "sample a corrupt bundle": (["sample", "{corrupt}"], "changed after export"),
}


@pytest.mark.parametrize("fault", CLI_FAULTS, ids=list(CLI_FAULTS))
def test_cli_refuses_bad_arguments_before_any_work(pristine, tmp_path, capsys, fault):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(pristine, corrupt)
    (corrupt / MANIFEST_NAME).write_text((corrupt / MANIFEST_NAME).read_text().replace("float32", "float16", 1))
    argv, message = CLI_FAULTS[fault]
    argv = [a.format(bundle=pristine, tmp=tmp_path, corrupt=corrupt) for a in argv]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - started < 20  # refused up front, not after a run


# --- round two: every state checked, no file lost, values checked where they enter -----------------------


def test_a_state_not_from_this_denoiser_is_refused(cached):
    x, t = torch.randn(SHAPE), torch.full((3,), 500)
    with pytest.raises(StateError, match="must be the RunState"):  # a plain tuple would run `cached` on zeros
        cached.step(1, x, t, LABELS, state=tuple(cached.init_state(3)))
    with pytest.raises(StateError, match="must be the RunState"):
        cached.step(0, x, t, LABELS, state=list(cached.init_state(3)))
    with pytest.raises(StateError, match="is on meta, the inputs on cpu"):
        cached.step(0, x, t, LABELS, state=cached.init_state(3, device="meta"))
    with pytest.raises(InputError, match="batch size 0"):
        cached.step(0, x[:0], t[:0], LABELS[:0], state=cached.init_state(1))


def _bundle_like(directory: Path) -> dict[str, bytes]:
    directory.mkdir()
    files = {"model.onnx": b"not ours", MANIFEST_NAME: b'{"mine": true}', "weights.bin": b"\x00\x01"}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


def test_export_never_empties_a_directory_that_is_not_a_loadable_bundle(cached, tmp_path):
    files = _bundle_like(tmp_path / "lookalike")
    with pytest.raises(ExportError, match="holds no loadable diffopt bundle"):
        to_onnx(cached, tmp_path / "lookalike")
    assert {p.name: p.read_bytes() for p in (tmp_path / "lookalike").iterdir()} == files
    (tmp_path / "link").symlink_to(tmp_path / "lookalike")  # through a link as well
    with pytest.raises(ExportError, match="holds no loadable diffopt bundle"):
        to_onnx(cached, tmp_path / "link")
    assert {p.name: p.read_bytes() for p in (tmp_path / "lookalike").iterdir()} == files


def test_export_into_a_symlinked_target_replaces_the_bundle_it_points_to(bundle, graph, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(bundle)
    to_onnx(optimize(graph, [IncrementCalibratedCachePass(rank=4, period=2)]), link)
    assert link.is_symlink() and set(Manifest.load(link).variants) == {"full", "calibrated"}
    assert set(Manifest.load(bundle).variants) == {"full", "calibrated"}


def test_an_export_killed_between_its_two_renames_is_recovered_at_the_next_load(bundle):
    before = _digests(bundle)
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from models import simple_dit
        import diffopt.export.onnx as exporter
        from diffopt import capture, optimize
        rename = os.rename
        def rename_then_die(source, target):  # the kill lands after the old bundle was moved away
            rename(source, target)
            if ".old-" in str(target):
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename_then_die  # every module renames through it, the bundle transaction too
        graph = capture(simple_dit(seed=9), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
        exporter.to_onnx(optimize(graph), {str(bundle)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not bundle.exists() and list(bundle.parent.glob(".bundle.old-*"))  # the window the kill hit
    load_bundle(bundle)  # the previous bundle is renamed back
    assert _digests(bundle) == before


def test_stale_staging_of_killed_exports_is_removed_by_the_next_export(cached, tmp_path):
    target = tmp_path / "bundle"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / ".bundle.partial-dead", tmp_path / ".bundle.partial-unowned"]
    running = tmp_path / ".bundle.partial-running"
    for directory in (*stale, running):
        directory.mkdir()
        (directory / "full.onnx").write_bytes(b"half")
    (stale[0] / ".export-pid").write_text(dead.stdout.strip())
    (running / ".export-pid").write_text(str(os.getpid()))  # a live export: left alone
    to_onnx(cached, target)
    assert not any(p.exists() for p in stale) and running.exists()
    Manifest.load(target)


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped elsewhere) and a way to fill it up."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def fill():
        try:
            with open(mount / "filler", "wb", buffering=0) as filler:
                while True:
                    filler.write(b"\0" * 4096)
        except OSError:  # the disk is full
            pass

    try:
        yield mount, fill
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def _statistics(absmax: float = 1.0):
    from diffopt import CalibrationStatistics
    from diffopt.ir.statistics import TemporalStatistics

    layers = {f"transformer_blocks.{i}.attn.to_q": absmax for i in range(200)}
    return CalibrationStatistics(temporal=TemporalStatistics(input_absmax=layers, difference_absmax=dict(layers)))


def _shortcut_table(configs: int):
    from diffopt.measure.shortcuts import ShortcutConfig, ShortcutTable

    return ShortcutTable(tuple(ShortcutConfig(4, (2,) * 50, 10**9, 0.5, 30.0 + i) for i in range(configs)), 50)


WRITERS = {  # every kind of file the project writes: a first version, then one that does not fit the full disk
    "calibration statistics": lambda path, big: _statistics(2.0 if big else 1.0).save(path),
    "shortcut table": lambda path, big: _shortcut_table(2000 if big else 2).save(path),
    "pass file": lambda path, big: __import__("diffopt.passes.registry").passes.registry.save_passes(
        path, [BlockCachePass()], notes="x" * (10**6 if big else 1)
    ),
    "PNG grid": lambda path, big: __import__("diffopt.evaluation.metrics.grid").evaluation.metrics.grid.save_grid(
        torch.rand(400 if big else 1, 1, 16, 16) * 2 - 1, path
    ),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_a_full_disk_leaves_the_previous_file_intact(full_disk, kind):
    mount, fill = full_disk
    path = mount / "file"
    WRITERS[kind](path, big=False)
    before = path.read_bytes()
    fill()
    (mount / "filler").write_bytes((mount / "filler").read_bytes()[: -2 * 4096])  # room for a little
    with pytest.raises(OSError):
        WRITERS[kind](path, big=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in mount.iterdir()) == ["file", "filler"]  # no partial file left behind


def _saved_statistics(tmp_path, edit):
    path = tmp_path / "calibration.json"
    _statistics().save(path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    return path


STATISTICS_FAULTS = {
    "NaN range": (
        lambda d: d["temporal"]["input_absmax"].update({"transformer_blocks.3.attn.to_q": math.nan}),
        r"temporal.input_absmax\['transformer_blocks.3.attn.to_q'\]: expected a finite number",
    ),
    "infinite range": (
        lambda d: d["temporal"]["difference_absmax"].update({"transformer_blocks.4.attn.to_q": math.inf}),
        r"temporal.difference_absmax\['transformer_blocks.4.attn.to_q'\]: expected a finite number",
    ),
    "zero range": (
        lambda d: d["temporal"]["input_absmax"].update({"transformer_blocks.5.attn.to_q": 0.0}),
        r"temporal.input_absmax\['transformer_blocks.5.attn.to_q'\]: expected a positive range, found 0.0",
    ),
    "negative range": (
        lambda d: d["temporal"]["difference_absmax"].update({"transformer_blocks.6.attn.to_q": -1.0}),
        r"temporal.difference_absmax\['transformer_blocks.6.attn.to_q'\]: expected a non-negative range",
    ),
    "missing section": (lambda d: d.pop("temporal"), "section 'temporal': expected an object"),
    "mistyped section": (
        lambda d: d["temporal"].update(input_absmax=[1.0]),
        "temporal.input_absmax: expected an object",
    ),
    "range as text": (
        lambda d: d["temporal"]["input_absmax"].update({"transformer_blocks.7.attn.to_q": "1.0"}),
        r"temporal.input_absmax\['transformer_blocks.7.attn.to_q'\]: expected a finite number",
    ),
    "bits": (lambda d: d["temporal"].update(bits=0), r"temporal.bits: expected an int in \[2, 16\]"),
    "every difference zero": (
        lambda d: d["temporal"].update(difference_absmax=dict.fromkeys(d["temporal"]["difference_absmax"], 0.0)),
        "temporal.difference_absmax: every layer's input difference is 0",
    ),
}


@pytest.mark.parametrize("fault", STATISTICS_FAULTS, ids=list(STATISTICS_FAULTS))
def test_calibration_statistics_are_checked_where_they_are_loaded(tmp_path, fault):
    from diffopt import CalibrationStatistics

    edit, message = STATISTICS_FAULTS[fault]
    path = _saved_statistics(tmp_path, edit)
    with pytest.raises(ValueError, match=f"calibration statistics {path}: {message}"):
        CalibrationStatistics.load(path)


def test_statistics_of_another_model_name_the_file_and_the_layer(graph, tmp_path):
    from diffopt import CalibrationStatistics

    path = tmp_path / "other-model.json"
    _statistics().save(path)
    with pytest.raises(PassError, match=rf"layer '[^']+' was not calibrated in {path}"):
        optimize(graph, [TemporalDifferencePass("difference")], calibration=CalibrationStatistics.load(path))


@pytest.mark.parametrize("labels", [[1, 11, 2], [-1, 0, 3]], ids=["past the table", "negative"])
def test_class_labels_outside_the_table_are_refused_by_name(cached, pristine, labels):
    x, t = torch.randn(SHAPE), torch.full((3,), 500)
    for denoiser in (cached, load_bundle(pristine, threads=1, verify_checksums=False)):
        with pytest.raises(InputError, match=r"y: values must be in \[0, 10\]"):
            denoiser.step(0, x, t, torch.tensor(labels), state=denoiser.init_state(3))
    with pytest.raises(InputError, match=r"y: values must be in \[0, 10\]"):  # before any step runs
        Sampler(make_scheduler(DDPM, num_steps=2), progress=False).sample(cached, (torch.tensor(labels),), shape=SHAPE)
    null = torch.tensor(next(label for label in labels if not 0 <= label <= 10))
    guided = Sampler(make_scheduler(DDPM, num_steps=2), guidance_scale=2.0, null_conditions=(null,), progress=False)
    with pytest.raises(InputError, match=r"y: values must be in \[0, 10\]"):  # a null class past the table
        guided.sample(cached, (LABELS,), shape=SHAPE)


VALUE_FAULTS = {
    "speculative negative clip": (
        lambda: SpeculativeDDPMSampler(torch.linspace(0.99, 0.01, 1000), 10, clip_sample=-1),
        "SpeculativeDDPMSampler.clip_sample must be a finite number >= 0.0",
    ),
    "speculative window as text": (
        lambda: SpeculativeDDPMSampler(torch.linspace(0.99, 0.01, 1000), 10, window="3"),
        "SpeculativeDDPMSampler.window must be an int >= 1 or None",
    ),
    "speculative steps past the schedule": (
        lambda: SpeculativeDDPMSampler(torch.linspace(0.99, 0.01, 100), 200),
        "num_steps 200 exceeds the 100 training timesteps",
    ),
    "fractional null class": (
        lambda: Sampler(
            make_scheduler(DDPM, num_steps=2), guidance_scale=2.0, null_conditions=(torch.tensor(10.5),)
        ).sample(lambda x, t, c: x, (LABELS,), shape=SHAPE),
        r"null_conditions\[0\] = \[10.5\] does not convert exactly to the condition's int64",
    ),
    "null condition of another shape": (
        lambda: Sampler(make_scheduler(DDPM, num_steps=2), guidance_scale=2.0, null_conditions=(torch.ones(2),)).sample(
            lambda x, t, c: x, (LABELS,), shape=SHAPE
        ),
        r"null_conditions\[0\] has shape \(2,\)",
    ),
    "seed past 64 bits": (
        lambda: Sampler(make_scheduler(DDPM), progress=False).sample(lambda x, t, c: x, shape=(1, 1), seed=2**64),
        "seed must be below 2\\*\\*64",
    ),
    "no training timesteps": (
        lambda: make_scheduler({"kind": "ddpm", "num_train_timesteps": 0}),
        "num_train_timesteps must be an int >= 2",
    ),
    "fractional training timesteps": (
        lambda: make_scheduler({"kind": "ddpm", "num_train_timesteps": 2.5}),
        "num_train_timesteps must be an int >= 2",
    ),
    "a billion training timesteps": (
        lambda: make_scheduler({"kind": "ddpm", "num_train_timesteps": 10**9}),
        "num_train_timesteps 1000000000 is above 100000",
    ),
    "enable without programs": (
        lambda: __import__("diffopt").pipelines.OptimizedComponent(simple_dit(), max_programs=0),
        "max_programs must be an int >= 1",
    ),
}


@pytest.mark.parametrize("fault", VALUE_FAULTS, ids=list(VALUE_FAULTS))
def test_values_are_checked_where_they_enter(fault):
    make, message = VALUE_FAULTS[fault]
    with pytest.raises(ValueError, match=message):
        make()


def test_a_shortcut_table_never_picks_a_run_that_diverged():
    from diffopt.measure.shortcuts import ShortcutConfig, ShortcutTable

    diverged = ShortcutConfig(2, (2,), 10, 0.1, math.nan)
    table = ShortcutTable((diverged, ShortcutConfig(4, (2,), 20, 0.2, 30.0)), 50)
    assert table.pick(max_macs=100).quality == 30.0
    with pytest.raises(ValueError, match="no configuration fits"):
        ShortcutTable((diverged,), 50).pick(max_macs=100)


BENCH_FAULTS = {
    "zero steps": ({"name": "x", "steps": 0}, r"configuration 'x'.steps must be an int >= 1"),
    "passes as an object": ({"name": "x", "passes": {"pass": "BlockCachePass"}}, "passes is a list of pass objects"),
    "baseline as text": ({"name": "x", "baseline": "cache-dit"}, "baseline is an object"),
    "unknown baseline": ({"name": "x", "baseline": {"kind": "magic"}}, r"configurations \['x'\]: a baseline's kind"),
    "nameless": ({"name": ""}, "name is a non-empty string"),
}


@pytest.mark.parametrize("fault", BENCH_FAULTS, ids=list(BENCH_FAULTS))
def test_bench_files_are_checked_before_any_run(tmp_path, fault):
    from diffopt.evaluation.bench import load_configurations
    from diffopt.models.zoo import UnknownModelError

    configuration, message = BENCH_FAULTS[fault]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"model": "dit-digits", "configurations": [{"name": "reference"}, configuration]}))
    with pytest.raises(ValueError, match=message):
        load_configurations(path)
    path.write_text(json.dumps({"model": "no-such-model", "configurations": [{"name": "reference"}]}))
    with pytest.raises(UnknownModelError, match="unknown reference model 'no-such-model'"):
        load_configurations(path)


def _loaders():
    from diffopt import CalibrationStatistics
    from diffopt.evaluation.bench import load_configurations
    from diffopt.measure.shortcuts import ShortcutTable
    from diffopt.passes.registry import load_passes

    return {
        "pass file": load_passes,
        "bench file": load_configurations,
        "calibration statistics": CalibrationStatistics.load,
        "shortcut table": ShortcutTable.load,
    }


@pytest.mark.parametrize("kind", ["pass file", "bench file", "calibration statistics", "shortcut table", "bundle"])
@pytest.mark.parametrize("content", [b'{"passes": "\xff\xfe"}', b"[" * 100_000], ids=["not UTF-8", "deeply nested"])
def test_unreadable_json_is_named_by_its_loader(bundle, tmp_path, kind, content):
    path = bundle / MANIFEST_NAME if kind == "bundle" else tmp_path / "file.json"
    path.write_bytes(content)
    load = (lambda p: Manifest.load(p.parent, verify_checksums=False)) if kind == "bundle" else _loaders()[kind]
    with pytest.raises(ValueError, match=r"file.json is not|manifest.json is not") as raised:
        load(path)
    assert "UTF-8" in str(raised.value) or "nested too deeply" in str(raised.value)


def test_the_cli_maps_library_value_errors_to_exit_2_and_one_line(tmp_path, capsys):
    statistics = _saved_statistics(tmp_path, lambda d: d["temporal"]["input_absmax"].update({"a": math.nan}))
    argv = ["export", "dit-digits", str(tmp_path / "b"), "--temporal-difference", "difference"]
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--calibration", str(statistics)])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.count("\n") == 1 and "expected a finite number" in err
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"model": "dit-digits", "configurations": [{"name": "r", "steps": "50"}]}))
    with pytest.raises(SystemExit) as raised:
        main(["bench", str(bench), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and err.count("\n") == 1 and "steps must be an int" in err


def test_graph_files_swapped_between_variants_are_refused_even_with_new_checksums(bundle):
    full, cached_file = (bundle / "full.onnx").read_bytes(), (bundle / "cached.onnx").read_bytes()
    (bundle / "full.onnx").write_bytes(cached_file)
    (bundle / "cached.onnx").write_bytes(full)
    listed = [line.split("  ")[1] for line in (bundle / CHECKSUMS_NAME).read_text().splitlines()]
    (bundle / CHECKSUMS_NAME).write_text("".join(f"{sha256_of(bundle / n)}  {n}\n" for n in listed))
    with pytest.raises(BundleError, match="full.onnx is not the file manifest.json field 'variants.full'"):
        load_bundle(bundle)


def test_symbolic_links_inside_a_bundle_are_refused(bundle, tmp_path):
    elsewhere = tmp_path / "weights-elsewhere.bin"
    shutil.move(bundle / "weights.bin", elsewhere)
    (bundle / "weights.bin").symlink_to(elsewhere)  # the same bytes, checksums still match
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(bundle)
