"""A diffusers pipeline as a ``measure.workload.Workload``: the user's calls, judged against
the unmodified pipeline's outputs of the same calls.

Each call is a dict of pipeline call arguments (``prompt`` or ``prompt_embeds``,
``class_labels``, ``height``, ``num_inference_steps``, ...) with an integer ``seed`` that
becomes its generator (``run_call``). Inputs: ``scoring`` and ``plan`` are ``calls``;
``held-out`` are ``validation_calls``; a pipeline has no ``fit`` inputs (no learned
predictors). A configuration runs through ``enable(pipe, passes)`` with its share of the
steps; its work is the full denoiser calls it made, each stream step priced by the MACs of
the variant it ran; the plain pipeline's is the number of denoiser calls. Quality is PSNR
with data range 1 for outputs in [0, 1] (images), else the reference's range. A timed run is
the first call, on a copy of the pipeline enabled with the configuration's passes. The
pipeline is left as it came.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffopt.ir.statistics import CalibrationStatistics
from diffopt.measure.fidelity import psnr
from diffopt.measure.workload import Configuration, Run, Workload
from diffopt.passes.registry import pass_from_dict


def run_call(pipe: Any, call: Mapping[str, Any], steps: int | None = None) -> torch.Tensor:
    """One call of ``pipe`` as bench and tune make it: an integer ``seed`` becomes its
    generator, ``steps`` (when given) its ``num_inference_steps``, ``output_type="np"`` unless
    the call says otherwise; the output comes back as one float64 tensor."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    arguments = {k: v for k, v in call.items() if k != "seed"}
    if call.get("seed") is not None:
        arguments["generator"] = torch.Generator().manual_seed(call["seed"])
    if steps is not None:
        arguments["num_inference_steps"] = max(1, steps)
    if "output_type" in parameters:
        arguments.setdefault("output_type", "np")
    if "return_dict" in parameters:
        arguments["return_dict"] = False
    output = pipe(**arguments)
    return _as_tensor(output[0] if isinstance(output, tuple) else output)


class PipelineWorkload(Workload):
    """``pipe`` and its ``calls`` (module docstring)."""

    def __init__(
        self,
        pipe: Any,
        calls: Sequence[Mapping[str, Any]],
        validation_calls: Sequence[Mapping[str, Any]],
        calibration: CalibrationStatistics | None = None,
    ):
        from diffopt.pipelines import _denoiser_name

        self.pipe, self.calibration = pipe, calibration
        self.calls = {"scoring": list(calls), "plan": list(calls), "held-out": list(validation_calls), "fit": []}
        self.denoiser = getattr(pipe, _denoiser_name(pipe))
        self.parameters = inspect.signature(type(pipe).__call__).parameters
        if "num_inference_steps" not in self.parameters:
            raise ValueError(f"tune(): {type(pipe).__name__}.__call__ takes no num_inference_steps")
        self.name = f"{type(self.denoiser).__name__} in {type(pipe).__name__}"
        self.reference_steps = self.steps(calls[0])

    def steps(self, call: Mapping[str, Any]) -> int:
        steps = call.get("num_inference_steps", self.parameters["num_inference_steps"].default)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"tune(): num_inference_steps must be an integer >= 2, found {steps!r}")
        return steps

    def graph(self) -> torch.fx.GraphModule:
        """The graph ``enable`` captures for the first call."""
        from diffopt.pipelines import _components, disable, enable

        enable(self.pipe)
        try:
            call = self.calls["scoring"][0]
            run_call(self.pipe, call, self.steps(call))
            return _components(self.pipe)[0].programs[-1].graph
        finally:
            disable(self.pipe)

    def unavailable(self, configuration: Configuration) -> str | None:
        if configuration.baseline is not None or configuration.bundle is not None:
            return "baselines and bundle configurations run on the digits models only"
        if configuration.needs_calibration and self.calibration is None:
            return "needs calibration statistics (pass calibration=)"
        return None

    def run(self, configuration: Configuration, inputs: str) -> Run:
        reason = self.unavailable(configuration)
        if reason is not None:
            raise ValueError(f"configuration {configuration.name!r} {reason}")
        calls = self.calls[inputs]
        if not calls:
            raise ValueError(f"a pipeline has no {inputs!r} calls")
        if configuration.passes is None:
            return self._plain(calls, configuration.steps)
        return self._enabled(configuration, calls)

    def quality(self, outputs: torch.Tensor, reference: torch.Tensor) -> float:
        low, high = float(reference.min()), float(reference.max())
        data_range = 1.0 if 0.0 <= low and high <= 1.0 else max(high - low, 1e-12)
        return psnr(outputs, reference, data_range=data_range)

    def timers(self, configurations: Sequence[Configuration]) -> dict[str, Callable[[int], Any]]:
        from diffopt.pipelines import enable

        call = self.calls["scoring"][0]
        timers = {}
        for configuration in configurations:
            pipe = self.pipe
            if configuration.passes is not None:
                passes = [pass_from_dict(item) for item in configuration.passes]
                pipe = enable(copy.deepcopy(self.pipe), passes, calibration=self.calibration)
            steps = self._call_steps(call, configuration)
            timers[configuration.name] = lambda _, pipe=pipe, steps=steps: run_call(pipe, call, steps)
        return timers

    def description(self) -> dict[str, Any]:
        return {
            "scored_on": f"{len(self.calls['scoring'])} calls",
            "validated_on": f"{len(self.calls['held-out'])} held-out calls",
            "timed_on": "the first call",
        }

    def _call_steps(self, call: Mapping[str, Any], configuration: Configuration) -> int:
        """``call``'s steps scaled by the configuration's share of the reference's."""
        steps = configuration.steps or self.reference_steps
        return round(self.steps(call) * steps / self.reference_steps)

    def _plain(self, calls: Sequence[Mapping[str, Any]], steps: int | None) -> Run:
        """The unmodified pipeline's outputs of ``calls``, and how many denoiser calls they made."""
        counted = [0]
        hook = self.denoiser.register_forward_pre_hook(lambda *_: counted.__setitem__(0, counted[0] + 1))
        try:
            plain = Configuration("plain", None, steps)
            outputs = torch.cat([run_call(self.pipe, call, self._call_steps(call, plain)).flatten() for call in calls])
        finally:
            hook.remove()
        return Run(outputs, counted[0])

    def _enabled(self, configuration: Configuration, calls: Sequence[Mapping[str, Any]]) -> Run:
        """``configuration``'s outputs of ``calls`` and its work in full denoiser calls."""
        from diffopt.pipelines import _components, disable, enable

        passes = [pass_from_dict(item) for item in configuration.passes]
        enable(self.pipe, passes, calibration=self.calibration)
        try:
            outputs, work, seen = [], 0.0, {}
            for call in calls:
                outputs.append(run_call(self.pipe, call, self._call_steps(call, configuration)).flatten())
                runs = _stream_work(_components(self.pipe)[0])
                work += sum(w for key, w in runs.items() if key not in seen)
                seen = runs
        finally:
            disable(self.pipe)
        return Run(torch.cat(outputs), work)


def _stream_work(component) -> dict[tuple, float]:
    """The work of each recent stream run of the component in full-step equivalents: its
    steps times the share of the MACs they ran."""
    from diffopt.pipelines.report import summarize

    work = {(r.program, r.run, r.stream): len(r.variants) * (1.0 - r.work_saved) for r in summarize(component).runs}
    if any(math.isnan(w) for w in work.values()):
        raise ValueError("tune(): the program ran has no graph to count MACs in")
    return work


def _as_tensor(images: Any) -> torch.Tensor:
    """A pipeline's output (numpy array, tensor, or a list of PIL images or arrays) as float64."""
    if isinstance(images, torch.Tensor):
        return images.detach().to("cpu", torch.float64)
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(image, dtype=np.float64) for image in images])
    return torch.from_numpy(np.asarray(images, dtype=np.float64))
