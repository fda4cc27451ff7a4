"""diffopt: a graph compiler for diffusion denoisers.

capture -> passes -> step program (explicit state, variants, schedule) -> runtime.

The packages are layers, each importing only those below it; the order and what each may
import are written once, in ``tests/test_layers.py`` (``ALLOWED``), which checks them.
``models`` (reference models) and ``evaluation`` (metrics, data, training, baselines:
``pip install diffopt[eval]``) sit on top and are never imported by the core.
"""

from diffopt.capture import CaptureError, capture
from diffopt.ir.policy import LayerPolicy
from diffopt.ir.program import StepProgram
from diffopt.ir.schedules import AdaptiveSchedule, ComposedSchedule, ListSchedule, Schedule
from diffopt.ir.signature import CapturedGraph, Signature
from diffopt.ir.specs import Role, StateEntry, StateError, StateSpec
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.measure.calibration import calibrate
from diffopt.optimize import optimize
from diffopt.passes.base import GraphPass, PassContext, PassError, PassNotApplicable, PassResult, Pipeline
from diffopt.pipelines import disable, enable, summary, tune
from diffopt.pipelines import export as export_pipeline
from diffopt.runtime.denoiser import OptimizedDenoiser
from diffopt.sampling.flow_map import FlowMapSampler
from diffopt.sampling.schedulers import DDIMScheduler, DDPMScheduler, FlowEulerScheduler, make_scheduler
from diffopt.sampling.sequential import Sampler
from diffopt.version import __version__

__all__ = [
    "CaptureError",
    "CapturedGraph",
    "Signature",
    "capture",
    "OptimizedDenoiser",
    "FlowMapSampler",
    "ListSchedule",
    "optimize",
    "enable",
    "disable",
    "summary",
    "tune",
    "export_pipeline",
    "calibrate",
    "CalibrationStatistics",
    "GraphPass",
    "PassContext",
    "PassError",
    "PassNotApplicable",
    "PassResult",
    "Pipeline",
    "LayerPolicy",
    "AdaptiveSchedule",
    "ComposedSchedule",
    "Role",
    "Schedule",
    "StateEntry",
    "StateError",
    "StateSpec",
    "StepProgram",
    "Sampler",
    "DDIMScheduler",
    "DDPMScheduler",
    "FlowEulerScheduler",
    "make_scheduler",
    "__version__",
]
