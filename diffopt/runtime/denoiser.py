"""``OptimizedDenoiser``: a step program on a backend, usable like the original model.

Functional use (what the ``Sampler`` does)::

    state = denoiser.init_state(batch_size)
    out, state = denoiser.step(k, x, t, *conditions, state=state)

Each run owns its state: ``init_state`` returns a ``RunState`` (a tuple of tensors that
knows its program and the step it feeds), ``step`` returns the next one and never writes
into the one it was given, so any number of runs (threads, interleaved runs) can share
one denoiser. ``step`` refuses a cached step on a fresh state, a state from another step
or from a program with other state, and inputs whose dtype, shape, batch or device do not
fit the signature (the message names the input).

Eager use: ``denoiser(x, t, *conditions)`` keeps the state itself, per thread and per
call stream (``runtime.streams``). In a bare loop it starts a fresh run (zero state,
step 0) on the first call, after ``reset()``, whenever the batch size changes, and when
the timestep goes up (every sampler walks from noise to data); a second call at the same
timestep is another stream with its own state (cond then uncond), and
``with denoiser.stream("uncond"):`` names a stream explicitly. ``with
denoiser.run_scope():`` marks one run (a pipeline call) and turns the heuristics off.

Nothing in a step waits on the device: per step, inputs are checked by shape, dtype and
device, and values only where they are on the host already (Python numbers, CPU tensors:
timesteps come from the scheduler, on the CPU); a dtype cast that may lose values is
refused for device tensors instead of compared. The documented exceptions read a value
because a decision needs it: an adaptive schedule's probe signal, the speculative
sampler's acceptance, and the bare-loop heuristics above (run scopes read nothing).
``tests/test_meta_device.py`` runs whole sampling loops on the ``meta`` device, where any
read fails.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from diffopt.ir.placement import place
from diffopt.ir.program import ProgramInterface, StepProgram
from diffopt.ir.schedules import BaseSchedule
from diffopt.ir.specs import BATCH, StateError, TensorSpec
from diffopt.runtime.backends import Executor, TorchBackend
from diffopt.runtime.streams import RunHistory, RunRecord, StreamTable

if TYPE_CHECKING:
    from diffopt.runtime.runtimes import Bundle


# Where ``step`` sends its forward in this context: None runs it here; a serving batcher
# (``serving.forward_batcher``) collects the forwards of many concurrent runs into one.
StepForwards = Callable[["OptimizedDenoiser", str, tuple, tuple], tuple]
_STEP_FORWARDS: contextvars.ContextVar[StepForwards | None] = contextvars.ContextVar("step_forwards", default=None)


@contextlib.contextmanager
def forwards_through(route: StepForwards) -> Iterator[None]:
    """Inside, every ``step`` of every denoiser hands its variant's forward to
    ``route(denoiser, variant, inputs, state) -> (out, new_state)`` instead of running it: a
    sampling run driven by code that is not ours (a diffusers pipeline's loop) can then share
    forwards with other runs. The step's checks, probe and state bookkeeping stay here."""
    token = _STEP_FORWARDS.set(route)
    try:
        yield
    finally:
        _STEP_FORWARDS.reset(token)


class InputError(ValueError):
    """An input of ``step`` / ``__call__`` does not fit the program's signature."""


class RunState(tuple):
    """The state tensors of one sampling run, with the program they belong to (its state
    spec and schedule) and the index of the step they feed."""

    def __new__(cls, tensors: Sequence[torch.Tensor], owner: tuple, next_step: int) -> RunState:
        state = super().__new__(cls, tensors)
        state.owner, state.next_step = owner, next_step
        return state


def batched_timestep(t: torch.Tensor | float | int, batch_size: int, device: torch.device) -> torch.Tensor:
    """A timestep as a (batch,) tensor: scalars and 0-d tensors are broadcast."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        return t.expand(batch_size).contiguous()
    if t.shape != (batch_size,):
        raise InputError(f"timestep: expected a scalar or shape ({batch_size},), found {tuple(t.shape)}")
    return t


def _conform(value, spec: TensorSpec, batch_size: int, device: torch.device) -> torch.Tensor:
    """``value`` checked against ``spec``; cast to its dtype only where that loses nothing."""
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{spec.name}: expected a tensor, found {type(value).__name__}")
    if value.device != device:
        raise InputError(
            f"{spec.name}: on {value.device}, but the latent is on {device}: put every input on one device"
        )
    expected = tuple(batch_size if d == BATCH else d for d in spec.shape)
    if tuple(value.shape) != expected:
        raise InputError(f"{spec.name}: expected shape {expected} (batch {batch_size}), found {tuple(value.shape)}")
    if spec.bounds is not None and value.device.type == "cpu":  # host values: no device sync in the step loop
        check_bounds(value, spec)
    dtype = spec.torch_dtype
    if value.dtype == dtype:
        return value
    if widens(value.dtype, dtype):
        return value.to(dtype)
    found = str(value.dtype).removeprefix("torch.")
    if value.device.type != "cpu":  # reading the values would stop the host until the device catches up
        raise InputError(
            f"{spec.name}: expected {spec.dtype}, found {found} on {value.device}; a cast that can lose values is "
            f"checked only for host (CPU) tensors: pass {spec.dtype}"
        )
    converted = value.to(dtype)
    if value.is_complex() or not torch.equal(converted.to(value.dtype), value):
        raise InputError(f"{spec.name}: expected {spec.dtype}, found {found} with values that do not convert exactly")
    return converted


def fed_inputs(specs: Sequence[TensorSpec], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The one rule by which a driver feeds a program: floating values take the program's
    floating dtype (a bf16 program gets bf16 latents, its output goes back to the driver's
    dtype), other values its dtype where that loses nothing (``widens``); anything else is
    passed as it is, for ``step`` to refuse by name."""
    fed = []
    for value, spec in zip(values, specs, strict=True):
        dtype = spec.torch_dtype
        floats = value.is_floating_point() and dtype.is_floating_point
        fed.append(value.to(dtype) if floats or widens(value.dtype, dtype) else value)
    return fed


def state_batch_axes(program: StepProgram | ProgramInterface) -> tuple[int, ...]:
    """The batch axis of each state entry: runs are concatenated and split along it
    (``OptimizedDenoiser.step_many``); a ``ValueError`` names an entry without exactly one."""
    axes = []
    for entry in program.state.entries:
        if entry.shape.count(BATCH) != 1:
            raise ValueError(
                f"state {entry.name!r} has shape {entry.shape} without one batch axis, so runs cannot share a forward"
            )
        axes.append(entry.shape.index(BATCH))
    return tuple(axes)


def widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every ``source`` value a denoiser input takes converts to ``target`` exactly,
    judged by the dtypes alone (no value is read): bool to anything, integers to floats
    (timesteps and class labels are far below float32's 2**24) or to wider integers, floats
    to floats with more precision and range."""
    if source.is_complex or target.is_complex:
        return False
    if source == torch.bool:
        return True
    if not source.is_floating_point:
        if target.is_floating_point:
            return True
        return (
            target != torch.bool
            and torch.iinfo(target).min <= torch.iinfo(source).min
            and (torch.iinfo(target).max >= torch.iinfo(source).max)
        )
    if not target.is_floating_point:
        return False
    wide, narrow = torch.finfo(target), torch.finfo(source)
    return wide.eps <= narrow.eps and wide.max >= narrow.max


def probe_signal(signal: torch.Tensor) -> float:
    """An adaptive schedule's probe signal on the host: the one value a step reads from the
    device (the next variant depends on it)."""
    return float(signal)


def _on_host(value: torch.Tensor | float | int) -> bool:
    """A Python number or a CPU tensor: its values can be read without waiting on a device."""
    return not isinstance(value, torch.Tensor) or value.device.type == "cpu"


def check_bounds(value: torch.Tensor, spec: TensorSpec) -> None:
    """Refuse index values (class labels) outside ``spec.bounds``, naming the input: torch would
    fail with a bare IndexError, onnxruntime silently read another row (-1: the null class)."""
    lowest, highest = spec.bounds
    if value.numel() and (int(value.min()) < lowest or int(value.max()) > highest):
        found = sorted({int(v) for v in value.flatten().tolist() if not lowest <= v <= highest})
        raise InputError(
            f"{spec.name}: values must be in [{lowest}, {highest}] (it indexes a table of {highest - lowest + 1} "
            f"rows), found {found[:8]}"
        )


class OptimizedDenoiser:
    """Runs ``program`` on ``backend``, an ``Executor`` (a torch backend by default). A
    ``ProgramInterface`` (no graphs) needs the executor that holds its variants: a bundle
    runtime, with the ``bundle`` it opened (``runtime.runtimes.load_bundle``)."""

    def __init__(
        self, program: StepProgram | ProgramInterface, backend: Executor | None = None, bundle: Bundle | None = None
    ):
        if backend is None and not isinstance(program, StepProgram):
            raise TypeError(f"OptimizedDenoiser needs a backend to run a {type(program).__name__} (it has no graphs)")
        self.program = program
        self.backend = backend if backend is not None else TorchBackend(program)
        self.bundle = bundle  # the bundle's manifest, or None for a program's graphs
        self.inputs = program.inputs
        self._owner = (program.state, program.schedule)
        self._local = threading.local()
        self._warned_heuristics = False  # warned once that a bare loop relies on timestep heuristics
        self._history = RunHistory()

    def __getstate__(self) -> dict:
        """Pickled (e.g. sent to a Ray Serve replica) without this process's eager runs."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_history")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _local=threading.local(), _history=RunHistory())

    @property
    def is_stateful(self) -> bool:
        return len(self.program.state) > 0

    @property
    def device(self) -> torch.device:
        """Where the program's weights are, and where inputs and state must be."""
        return self.program.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> OptimizedDenoiser:
        """A new denoiser running the program placed on ``device`` / cast to ``dtype``
        (``ir.placement.place``) on a backend of the same kind; this one is unchanged."""
        if self.bundle is not None:
            raise TypeError(
                "a denoiser loaded from a bundle runs where its runtime runs: choose the runtime's options "
                "(onnxruntime's providers) when loading it instead of calling .to()"
            )
        placed = place(self.program, device, dtype)
        return OptimizedDenoiser(placed, backend=type(self.backend).for_program(placed, self.backend))

    def with_schedule(self, schedule: BaseSchedule) -> OptimizedDenoiser:
        """A denoiser running the same variants on the same backend under another schedule
        (e.g. ``passes.length_shortcut.depth_schedule([2, 4, 6])``); this one is unchanged."""
        missing = sorted(set(schedule.variants) - set(self._variants))
        if missing:
            raise ValueError(f"the schedule uses variants {missing}; this program has {sorted(self._variants)}")
        program = dataclasses.replace(self.program, schedule=schedule)
        return OptimizedDenoiser(program, backend=self.backend, bundle=self.bundle)

    @property
    def _variants(self) -> tuple[str, ...]:
        """The variants this denoiser can run (its executor's: a bundle has no graphs)."""
        return self.backend.variants

    @property
    def last_variant(self) -> str | None:
        """The variant this thread's last step ran."""
        return getattr(self._local, "last_variant", None)

    def reset(self) -> None:
        """Forget this thread's eager-mode state: the next call starts a new sampling run."""
        self._local.__dict__.clear()

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> RunState:
        """Zero state for a run of ``batch_size`` samples (on the program's device by default)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an int >= 1, found {batch_size!r}")
        state = self.program.state.allocate(batch_size, self.device if device is None else device)
        return RunState(state, self._owner, 0)

    def _check_state(
        self, step_index: int, state: Sequence[torch.Tensor], batch_size: int, device: torch.device
    ) -> None:
        if isinstance(step_index, bool) or not isinstance(step_index, int) or step_index < 0:
            raise InputError(f"step_index must be an int >= 0, found {step_index!r}")
        if not self.is_stateful:
            self.program.state.check(state, batch_size)
            return
        if not isinstance(state, RunState):
            raise StateError(
                f"state must be the RunState this denoiser's init_state() or step() returned, found a "
                f"{type(state).__name__}: a plain tuple carries no step index, so a cached step could read zeros"
            )
        self.program.state.check(state, batch_size)
        for entry, tensor in zip(self.program.state.entries, state):
            if tensor.device != device:
                raise StateError(
                    f"state {entry.name!r} is on {tensor.device}, the inputs on {device}: start the run with "
                    f"init_state(batch_size, device) on the inputs' device"
                )
        if state.owner != self._owner:
            raise StateError(
                "this state belongs to a program with another state spec or schedule: start a run with "
                "this denoiser's init_state()"
            )
        if state.next_step == 0 and step_index > 0:
            raise StateError(
                f"step {step_index} on a fresh state: a run starts at step 0, which fills the caches "
                f"the later steps read"
            )
        if step_index != state.next_step:
            raise StateError(
                f"step {step_index} was given the state after step {state.next_step - 1}: pass the "
                f"state the previous step returned"
            )

    def step(
        self,
        step_index: int,
        x: torch.Tensor,
        t: torch.Tensor | float,
        *conditions: torch.Tensor,
        state: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, RunState]:
        """Run step ``step_index``: ``(out, new_state)``; ``state`` must match the batch.

        The variant that ran is in ``last_variant`` (where the schedule has a probe, the probe
        ran first and chose it)."""
        latent_spec, timestep_spec, *condition_specs = self.inputs
        if len(conditions) != len(condition_specs):
            raise InputError(
                f"expected conditions {list(self.program.signature.conditions)}, found {len(conditions)} condition "
                f"tensors"
            )
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise InputError(f"{latent_spec.name}: expected a batched tensor, found {x!r:.60}")
        batch_size = x.shape[0]
        if batch_size == 0:
            raise InputError(f"{latent_spec.name}: batch size 0: a step needs at least one sample")
        x = _conform(x, latent_spec, batch_size, x.device)
        if _on_host(t) and not bool(torch.isfinite(torch.as_tensor(t)).all()):  # device values: the sampler's check
            raise InputError(f"{timestep_spec.name}: not finite: {t}")
        t = _conform(batched_timestep(t, batch_size, x.device), timestep_spec, batch_size, x.device)
        conditions = tuple(_conform(c, s, batch_size, x.device) for c, s in zip(conditions, condition_specs))
        self._check_state(step_index, state, batch_size, x.device)
        schedule = self.program.schedule
        probe, signal = schedule.probe_at(step_index), None
        if probe is not None:
            signal, *state = self.backend.run(probe, (x, t, *conditions, *state))
            signal = probe_signal(signal)
        variant = schedule.variant_at(step_index, signal)
        self._local.last_variant = variant
        route = _STEP_FORWARDS.get()
        if route is None:
            ((out, new_state),) = self.step_many(variant, [((x, t, *conditions), state)])
        else:
            out, new_state = route(self, variant, (x, t, *conditions), tuple(state))
        return out, RunState(new_state, self._owner, step_index + 1)

    def step_many(
        self, variant: str, runs: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]
    ) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """One forward of ``variant`` for several runs, each ``(inputs, state)`` at its own step
        (inputs: latent, per-sample timesteps, conditions, already checked and fed by
        ``fed_inputs``): the inputs are concatenated along the batch, each state entry along
        its batch axis (``state_batch_axes``); each run's output and new state come back
        split. Every driver runs a variant through here: ``step`` with one run, the serving
        engine with a group of requests."""
        if len(runs) == 1:
            inputs, state = runs[0]
            outputs = self.backend.run(variant, (*inputs, *state))
            return [(outputs[0], tuple(outputs[1:]))]
        axes = state_batch_axes(self.program)
        sizes = [inputs[0].shape[0] for inputs, _ in runs]
        inputs = [torch.cat(column) for column in zip(*(inputs for inputs, _ in runs))]
        state = [torch.cat([run[1][index] for run in runs], dim=axis) for index, axis in enumerate(axes)]
        outputs = self.backend.run(variant, (*inputs, *state))
        parts = [outputs[0].split(sizes), *(t.split(sizes, dim=axis) for t, axis in zip(outputs[1:], axes))]
        return [(parts[0][index], tuple(p[index] for p in parts[1:])) for index in range(len(runs))]

    @contextlib.contextmanager
    def stream(self, name: str):
        """Calls inside ``with denoiser.stream(name):`` use stream ``name``'s own state (the
        analogue of diffusers' ``cache_context``): e.g. the unconditional branch of a
        two-call classifier-free guidance loop. Each stream equals a separate run."""
        if not isinstance(name, str) or not name:
            raise InputError(f"a stream name is a non-empty string, found {name!r}")
        previous = getattr(self._local, "explicit_stream", None)
        self._local.explicit_stream = name
        try:
            yield self
        finally:
            self._local.explicit_stream = previous

    @contextlib.contextmanager
    def run_scope(self):
        """Eager calls inside belong to one sampling run (a pipeline call): every stream starts
        fresh here, each call is the next step of its stream (no timestep heuristics), and the
        streams are released at the end, also when the run is cancelled by an exception."""
        previous = getattr(self._local, "streams", None)
        self._local.streams = StreamTable(self._history.new_run(), scoped=True)
        try:
            yield self
        finally:
            self._local.streams = previous

    @property
    def active_streams(self) -> int:
        """How many eager streams this thread holds now (bounded by ``streams.MAX_STREAMS``)."""
        table = getattr(self._local, "streams", None)
        return 0 if table is None else len(table.auto) + len(table.named)

    def run_history(self) -> list[RunRecord]:
        """The variants each stream of the recent eager runs ran (every thread, oldest first)."""
        return self._history.records()

    def _streams(self) -> StreamTable:
        table = getattr(self._local, "streams", None)
        if table is None:
            table = self._local.streams = StreamTable(self._history.new_run(), scoped=False)
        return table

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, *conditions: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise InputError(f"{self.inputs[0].name}: expected a batched tensor, found {x!r:.60}")
        batch = x.shape[0]
        t = batched_timestep(t, batch, x.device)
        streams = self._streams()
        if not streams.scoped and self.program.state.entries and not self._warned_heuristics:
            self._warned_heuristics = True
            warnings.warn(
                "diffopt: this denoiser carries state between steps and is called outside a run scope, so a new "
                "sampling run is told apart by its timestep going up; a run abandoned and restarted at the same or "
                "a lower timestep would reuse the old run's cache. Wrap each run in `with denoiser.run_scope():`.",
                stacklevel=2,
            )
        # outside a run scope (a bare loop), which stream a call continues is guessed from its timestep: that
        # reads it (a device sync for a device tensor); pipelines and samplers open run scopes and read nothing
        slot = streams.slot_for(getattr(self._local, "explicit_stream", None), batch, lambda: float(t.max()))
        state = slot.stream.state if slot.stream is not None else self.init_state(batch, x.device)
        out, state = self.step(state.next_step, x, t, *conditions, state=state)
        streams.commit(slot, state, self._local.last_variant, batch, self._history)
        return out
