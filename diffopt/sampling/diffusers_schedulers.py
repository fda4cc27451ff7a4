"""diffusers' schedulers as diffopt schedulers: ``make_scheduler(DPMSolverMultistepScheduler())``.

``DiffusersScheduler`` runs a diffusers scheduler (an object, or its config with
``_class_name``) in diffopt's samplers with the scheduler's own arithmetic, so a
flow-matching scheduler stays flow-matching and a multistep solver (DPM-Solver, UniPC)
keeps its history. Each sampling run (``scale_model_input`` at step 0) works on a fresh
copy of the scheduler after ``set_timesteps(num_steps)``, per thread, so runs never share
a step counter or a solver history. ``num_steps`` is the number of model calls:
``len(timesteps)``, which is twice the steps less one for second-order schedulers (Heun).
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Mapping
from typing import Any

import torch

from diffopt.util.validation import require_int


def is_diffusers_scheduler(value: Any) -> bool:
    """A diffusers scheduler object (``SchedulerMixin``: ``set_timesteps``, ``step``, ``config``)."""
    return all(hasattr(value, name) for name in ("set_timesteps", "step", "config"))


def scheduler_from_config(config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler a config names in ``_class_name``; a ``ValueError`` naming a class
    diffusers does not have."""
    import diffusers

    name = config["_class_name"]
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and hasattr(cls, "from_config") and hasattr(cls, "set_timesteps")):
        raise ValueError(f"make_scheduler: config names scheduler {name!r}, which is not a diffusers scheduler class")
    return cls.from_config(dict(config))


def scheduler_class_by_keys(config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler class whose settings are exactly ``config``'s keys (a config
    copied into a plain dict may have no ``_class_name``: ``dict(pipe.scheduler.config)``), or
    None when no class has them. Of classes with the same settings (``DDIMScheduler`` and
    ``DDIMParallelScheduler``, whose sequential steps are the same arithmetic), the plain one:
    the shortest name."""
    import diffusers

    keys = {key for key in config if not key.startswith("_")}
    matches = []
    for name in (name for name in dir(diffusers) if name.endswith("Scheduler")):
        try:
            cls = getattr(diffusers, name)
            usable = isinstance(cls, type) and hasattr(cls, "set_timesteps") and hasattr(cls, "from_config")
        except ImportError:  # a scheduler whose optional dependency is not installed
            continue
        if usable and set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"} == keys:
            matches.append(cls)
    return min(matches, key=lambda cls: len(cls.__name__), default=None)


class DiffusersScheduler:
    """A diffusers scheduler behind diffopt's ``Scheduler`` interface (module docstring)."""

    def __init__(self, scheduler: Any, num_steps: int):
        require_int("DiffusersScheduler", "num_steps", num_steps, minimum=1)
        self.template = copy.deepcopy(scheduler)
        self.requested_steps = num_steps
        self.timesteps = self._fresh().timesteps.clone()  # the model's timestep input at each call
        self.num_steps = len(self.timesteps)
        self._takes_generator = "generator" in inspect.signature(self.template.step).parameters
        self._local = threading.local()

    @property
    def name(self) -> str:
        return type(self.template).__name__

    def _fresh(self) -> Any:
        scheduler = copy.deepcopy(self.template)
        scheduler.set_timesteps(self.requested_steps)
        return scheduler

    def scale_model_input(self, x: torch.Tensor, step_index: int) -> torch.Tensor:
        """The model's latent input at ``step_index`` (Euler-type schedulers scale it); step 0
        starts a new run on a fresh copy of the scheduler."""
        if step_index == 0:
            self._local.scheduler = self._fresh()
        scheduler = self._run()
        if not hasattr(scheduler, "scale_model_input"):  # flow matching: the model sees x itself
            return x
        return scheduler.scale_model_input(x, self.timesteps[step_index])

    def step(self, model_output, step_index, x, generator):
        keywords = {"generator": generator} if self._takes_generator else {}
        return self._run().step(model_output, self.timesteps[step_index], x, return_dict=False, **keywords)[0]

    def _run(self) -> Any:
        scheduler = getattr(self._local, "scheduler", None)
        if scheduler is None:
            raise RuntimeError(f"{self.name}: a run starts at step 0 (scale_model_input(x, 0))")
        return scheduler
