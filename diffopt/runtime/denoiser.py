"""``OptimizedDenoiser``: a step program on a backend, usable like the original model.

Functional use (what the ``Sampler`` does)::

    state = denoiser.init_state(batch_size)
    out, state = denoiser.step(k, x, t, *conditions, state=state)

Eager use: ``denoiser(x, t, *conditions)`` keeps the state itself. It starts a fresh
run (zero state, step 0) on the first call, after ``reset()``, whenever the batch
size changes, and when the timestep does not decrease from the previous call (every
sampler walks from noise to data, so a timestep that does not go down means a new run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffopt.ir.program import ProgramInterface, StateError, StepProgram
from diffopt.runtime.backends import Backend, TorchBackend


def batched_timestep(t: torch.Tensor | float | int, batch_size: int, device: torch.device) -> torch.Tensor:
    """A timestep as a (batch,) tensor: scalars and 0-d tensors are broadcast."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        return t.expand(batch_size).contiguous()
    if t.shape != (batch_size,):
        raise ValueError(f"expected a scalar timestep or one of shape ({batch_size},), found {tuple(t.shape)}")
    return t


class OptimizedDenoiser:
    """Runs ``program`` on ``backend`` (torch by default). A ``ProgramInterface`` (a loaded
    bundle: no graphs) needs the backend that holds its variants."""

    def __init__(self, program: StepProgram | ProgramInterface, backend: Backend | None = None):
        if backend is None and not isinstance(program, StepProgram):
            raise TypeError(f"OptimizedDenoiser needs a backend to run a {type(program).__name__} (it has no graphs)")
        self.program = program
        self.backend = backend if backend is not None else TorchBackend(program)
        self.last_variant: str | None = None
        self.reset()

    @property
    def is_stateful(self) -> bool:
        return len(self.program.state) > 0

    def reset(self) -> None:
        """Forget the eager-mode state: the next call starts a new sampling run."""
        self._state: tuple[torch.Tensor, ...] | None = None
        self._step_index = 0
        self._last_timestep: float | None = None

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        return self.program.state.allocate(batch_size, device)

    def step(
        self,
        step_index: int,
        x: torch.Tensor,
        t: torch.Tensor | float,
        *conditions: torch.Tensor,
        state: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run step ``step_index``: ``(out, new_state)``; ``state`` must match the batch.

        The variant that ran is in ``last_variant`` (where the schedule has a probe, the probe
        ran first and chose it)."""
        if len(conditions) != len(self.program.signature.conditions):
            raise ValueError(
                f"expected conditions {list(self.program.signature.conditions)}, "
                f"found {len(conditions)} condition tensors"
            )
        batch_size = x.shape[0]
        self.program.state.check(state, batch_size)
        t = batched_timestep(t, batch_size, x.device)
        schedule = self.program.schedule
        probe, signal = schedule.probe_at(step_index), None
        if probe is not None:
            signal, *state = self.backend.run(probe, (x, t, *conditions, *state))
            signal = float(signal)
        self.last_variant = schedule.variant_at(step_index, signal)
        outputs = self.backend.run(self.last_variant, (x, t, *conditions, *state))
        return outputs[0], tuple(outputs[1:])

    def _starts_new_run(self, x: torch.Tensor, t: torch.Tensor) -> bool:
        if self._state is None:
            return True
        try:
            self.program.state.check(self._state, x.shape[0])
        except StateError:
            return True  # batch size (or composition) changed: never reuse stale state
        return self._last_timestep is not None and float(t.max()) >= self._last_timestep

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, *conditions: torch.Tensor) -> torch.Tensor:
        t = batched_timestep(t, x.shape[0], x.device)
        if self._starts_new_run(x, t):
            self._state = self.init_state(x.shape[0], x.device)
            self._step_index = 0
        out, self._state = self.step(self._step_index, x, t, *conditions, state=self._state)
        self._step_index += 1
        self._last_timestep = float(t.max())
        return out
