"""A shipped digits model as a ``measure.workload.Workload``: class-conditional digits from
seeded noise, judged against the unmodified model's 50-step samples from the same noise.

Inputs: ``scoring`` is ``samples`` digits of ``seed``'s noise; ``held-out`` is
``validation_samples`` digits of ``VALIDATION_SEED``'s (noise no scoring run draws); ``plan``
is the first ``PLAN_SEARCH_SAMPLES`` of the scoring digits; ``fit`` is ``LEARNED_FIT_SAMPLES``
digits of ``LEARNED_FIT_SEED``'s noise (neither scoring's nor validation's). Labels cycle
0..9. Work is the MACs counted while a run executes (``measure.macs.count_macs``), so
adaptive methods are charged for the decisions they made. A timed run samples
``timing_batch`` digits. Bench's further metrics: digits FD, classifier accuracy, relative L2
and predicted-label agreement with the reference's samples.

Configurations: pass lists on a backend or exported as a bundle (in a temporary directory,
removed with the workload), the unmodified model, or a baseline from another library
(``baseline={"kind": "diffusers-hook" | "cache-dit", ...}``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffopt.capture import capture
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd, label_agreement
from diffopt.evaluation.runs import generate, scheduler, timed_run
from diffopt.ir.program import StepProgram
from diffopt.measure.calibration import calibrate
from diffopt.measure.fidelity import relative_l2
from diffopt.measure.macs import count_macs
from diffopt.measure.predictor_fit import learned_candidate
from diffopt.measure.workload import Configuration, Run, Workload
from diffopt.models import example_inputs, load
from diffopt.optimize import optimize
from diffopt.passes.registry import pass_from_dict
from diffopt.passes.static_quantization import INT8_STATIC
from diffopt.sampling.sequential import Sampler

BASELINE_KINDS = ("diffusers-hook", "cache-dit")
REFERENCE_STEPS = 50  # the zoo models' reference run
CALIBRATION_SEED = 0
VALIDATION_SEED = 1_000_000  # noise no calibration run draws
PLAN_SEARCH_SAMPLES = 24  # samples per plan the plan search measures
LEARNED_FIT_SEED = 500_000  # the noise a learned predictor is fitted on (neither scoring's nor validation's)
LEARNED_FIT_SAMPLES = 16


def counted_run(denoiser: Callable, config: dict, steps: int, samples: int, seed: int) -> Run:
    """``samples`` digits of ``seed``'s noise in ``steps`` steps, and the MACs they took."""
    with count_macs() as counter:
        images = generate(denoiser, config, steps, samples, seed=seed)
    return Run(images, counter.macs)


class DigitsWorkload(Workload):
    """``model_name`` (a shipped digits model) and its seeded inputs (module docstring)."""

    def __init__(
        self,
        model_name: str,
        *,
        samples: int = 100,
        validation_samples: int = 200,
        timing_batch: int = 20,
        seed: int = CALIBRATION_SEED,
    ):
        self.name, self.reference_steps = model_name, REFERENCE_STEPS
        self.model, self.config = load(model_name)
        self.captured = capture(self.model, example_inputs(model_name))
        self.samples, self.validation_samples, self.timing_batch, self.seed = (
            samples,
            validation_samples,
            timing_batch,
            seed,
        )
        self.denoisers: dict[str, Callable] = {}  # by configuration name
        self._calibration = None
        self._bundles = None  # the exported configurations' bundles, removed with the workload
        self._programs: dict[str, Callable] = {}  # each bundle configuration's program in torch (its MACs)

    def graph(self) -> torch.fx.GraphModule:
        return self.captured

    def inputs(self, role: str) -> tuple[int, int]:
        """(samples, seed) of the inputs of ``role``."""
        return {
            "scoring": (self.samples, self.seed),
            "held-out": (self.validation_samples, VALIDATION_SEED),
            "plan": (min(PLAN_SEARCH_SAMPLES, self.samples), self.seed),
            "fit": (LEARNED_FIT_SAMPLES, LEARNED_FIT_SEED),
        }[role]

    def run(self, configuration: Configuration, inputs: str) -> Run:
        """The run's digits and MACs; a bundle's MACs are its program's, counted on a torch run
        of the same inputs (onnxruntime and OpenVINO run outside torch's counters)."""
        samples, seed = self.inputs(inputs)
        run = counted_run(self.denoiser(configuration), self.config, configuration.steps, samples, seed)
        if configuration.bundle is None:
            return run
        program = self._programs[configuration.name]
        return Run(run.outputs, counted_run(program, self.config, configuration.steps, samples, seed).work)

    def denoiser(self, configuration: Configuration) -> Callable:
        """What a ``Sampler`` drives for ``configuration`` (built once)."""
        if configuration.name not in self.denoisers:
            self.denoisers[configuration.name] = self._build(configuration)
        return self.denoisers[configuration.name]

    def timers(self, configurations: Sequence[Configuration]) -> dict[str, Callable[[int], Any]]:
        return {c.name: timed_run(self.denoiser(c), self.config, c.steps, self.timing_batch) for c in configurations}

    def metrics(self, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        return {
            "rel_l2": relative_l2(outputs, reference),
            "label_agreement": label_agreement(outputs, reference),
            "fd": digits_fd(outputs),
            "accuracy": class_accuracy(outputs, torch.arange(len(outputs)) % 10),
        }

    def learned(self, row: dict) -> Configuration | None:
        samples, seed = self.inputs("fit")

        def sample(denoiser, steps):
            return generate(denoiser, self.config, steps, samples, seed=seed)

        return learned_candidate(row, StepProgram.from_captured(self.captured), sample)

    def description(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "validation_samples": self.validation_samples,
            "timing_batch": self.timing_batch,
            "scored_on": f"{self.samples} samples from calibration noise",
            "validated_on": f"{self.validation_samples} samples from held-out noise",
            "timed_on": f"{self.timing_batch} samples",
            "calibration_seed": self.seed,
            "validation_seed": VALIDATION_SEED,
        }

    def calibration(self):
        """Statistics for the passes that need them (made once): a 50-step run of 20 samples, two seeds."""
        if self._calibration is None:
            sampler = Sampler(scheduler(self.config, REFERENCE_STEPS), progress=False)
            program = optimize(self.captured).program
            self._calibration = calibrate(program, sampler, (torch.arange(20) % 10,), (20, 1, 16, 16), seeds=(777, 778))
        return self._calibration

    def _build(self, configuration: Configuration) -> Callable:
        from diffopt.evaluation.baselines import CacheDitBaseline, DiffusersCacheHook, mag_cache_ratios

        if configuration.baseline is not None:
            options = {k: v for k, v in configuration.baseline.items() if k != "kind"}
            kind = configuration.baseline.get("kind")
            if kind == "cache-dit":
                return CacheDitBaseline(self.model, configuration.steps, **options)
            if kind != "diffusers-hook":
                raise ValueError(f"configuration {configuration.name!r}: a baseline's kind is one of {BASELINE_KINDS}")
            if options.get("taylor_factors_dtype") == "float32":
                options["taylor_factors_dtype"] = torch.float32
            if options["method"] == "mag-cache" and "mag_ratios" not in options:  # calibrated on other noise
                steps = options["num_inference_steps"] = configuration.steps
                ratios = mag_cache_ratios(self.model, steps, lambda hook: generate(hook, self.config, steps, 20, 777))
                options["mag_ratios"] = ratios
            return DiffusersCacheHook(self.model, options.pop("method"), **options)
        if configuration.passes is None:
            return self.model
        passes = [pass_from_dict(item) for item in configuration.passes]
        calibration = self.calibration() if configuration.needs_calibration else None
        if configuration.bundle is None:
            return optimize(self.captured, passes, calibration=calibration, backend=configuration.backend)
        return self._exported(configuration, passes, calibration)

    def _exported(self, configuration: Configuration, passes: list, calibration) -> Callable:
        """The configuration's program exported in its bundle's precision (``int8-static``:
        its Q/DQ pass added) and loaded on its runtime, from a directory the workload keeps."""
        from diffopt.export import to_onnx
        from diffopt.runtime.runtimes import load_bundle

        precision = configuration.bundle.get("precision", "fp32")
        if precision == "int8-static":
            passes = [*passes, INT8_STATIC]
        if self._bundles is None:
            self._bundles = tempfile.TemporaryDirectory(prefix="diffopt-bundles-")
        directory = Path(self._bundles.name) / str(len(self.denoisers))
        optimized = self._programs[configuration.name] = optimize(self.captured, passes, calibration=calibration)
        to_onnx(optimized, directory, scheduler_config=self.config, precision=precision)
        runtime = configuration.bundle.get("runtime", "onnxruntime")
        return load_bundle(directory, runtime, threads=torch.get_num_threads())
