"""diffopt: a graph compiler for diffusion denoisers.

capture -> passes -> step program (explicit state, variants, schedule) -> runtime.
"""
import os

# OpenMP spin-waiting made 2-thread torch forwards up to 4x slower on shared CPUs; passive
# waiting is the better default for sampling loops (set before torch loads OpenMP; an
# explicit user setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from diffopt.capture import CaptureError, CapturedGraph, Signature, capture
from diffopt.denoiser import OptimizedDenoiser
from diffopt.optimize import optimize
from diffopt.passes.base import GraphPass, PassContext, PassError, PassResult, Pipeline
from diffopt.policy import LayerPolicy
from diffopt.program import AdaptiveSchedule, Schedule, StateEntry, StateError, StateSpec, StepProgram
from diffopt.runtime.sampler import Sampler
from diffopt.runtime.schedulers import DDIMScheduler, DDPMScheduler, FlowEulerScheduler, make_scheduler

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "CapturedGraph", "Signature", "capture", "OptimizedDenoiser", "optimize", "GraphPass",
    "PassContext", "PassError", "PassResult", "Pipeline", "LayerPolicy", "AdaptiveSchedule", "Schedule", "StateEntry", "StateError",
    "StateSpec", "StepProgram", "Sampler", "DDIMScheduler", "DDPMScheduler", "FlowEulerScheduler",
    "make_scheduler", "__version__",
]
