"""Which run and stream an eager call of a step program belongs to.

``OptimizedDenoiser.__call__`` keeps state itself. A thread's ``StreamTable`` holds its
streams: automatic ones (bare loops: a second call at the same timestep is another
stream, a higher timestep or another batch size starts a new run) and named ones
(``denoiser.stream(name)``, diffusers' ``cache_context``). Inside a run scope (a pipeline
call: ``denoiser.run_scope()``) there are no heuristics: every stream starts fresh at the
scope's start, each call is the next step of its named stream (``"default"`` outside any
``cache_context``; a scheduler that repeats a timestep, as Heun's does, stays in it), and
the streams are released when the scope ends.

Choosing a stream (``slot_for``) changes nothing; only ``commit``, after the step ran,
does, so a refused or failed call leaves the table as it was. Streams are bounded
(``MAX_STREAMS`` per thread) and every run's variants are recorded for ``summary``.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_STREAMS = 8  # per thread: automatic streams beyond it start a new run; named ones evict the oldest
HISTORY = 64  # run records kept per denoiser
DEFAULT_STREAM = "default"


@dataclass
class RunRecord:
    """What one stream of one run ran: the variant of each step, in order."""

    run: int
    stream: str
    batch: int
    variants: list[str] = field(default_factory=list)


@dataclass
class Stream:
    state: tuple  # the RunState the next step reads
    record: RunRecord
    last_timestep: float | None = None  # bare loops only: the timestep heuristics read it


@dataclass(frozen=True)
class Slot:
    """Where a call goes: an existing stream to continue, or a fresh one (``stream`` None)."""

    name: str | int  # a stream name, or an automatic stream's index
    stream: Stream | None
    restart: bool = False  # drop every automatic stream first (a new run of the bare loop)
    now: float | None = None


class StreamTable:
    """One thread's eager streams (see the module docstring)."""

    def __init__(self, run: int, scoped: bool):
        self.run, self.scoped = run, scoped
        self.auto: list[Stream] = []
        self.named: dict[str, Stream] = {}

    def slot_for(self, explicit: str | None, batch: int, timestep: Callable[[], float]) -> Slot:
        """The stream a call of ``batch`` samples goes to; ``timestep()`` (a host read of the
        largest timestep) is only called for the heuristics of bare loops."""
        if self.scoped:
            name = explicit or DEFAULT_STREAM
            stream = self.named.get(name)
            return Slot(name, stream if stream is not None and stream.record.batch == batch else None)
        now = timestep()
        if explicit is not None:
            stream = self.named.get(explicit)
            fresh = stream is None or stream.record.batch != batch or now >= stream.last_timestep
            return Slot(explicit, None if fresh else stream, now=now)
        first = self.auto[0] if self.auto else None
        if first is not None and (now > first.last_timestep or first.record.batch != batch):
            return Slot(0, None, restart=True, now=now)  # sampling walks down: a higher timestep is a new run
        for index, stream in enumerate(self.auto):
            if stream.last_timestep > now:
                return Slot(index, stream, now=now)
        if len(self.auto) >= MAX_STREAMS:  # calls at one timestep without end: a new run, not a new stream
            return Slot(0, None, restart=True, now=now)
        return Slot(len(self.auto), None, now=now)

    def commit(self, slot: Slot, state: tuple, variant: str, batch: int, history: RunHistory) -> None:
        """Record a step that ran in ``slot``: its new state, and its variant in the stream's run
        record (a fresh stream starts a record in ``history``)."""
        if slot.restart:
            self.auto.clear()
            self.run = history.new_run()
        stream = slot.stream
        if stream is None:
            stream = Stream(state, RunRecord(self.run, _stream_label(slot.name), batch))
            history.add(stream.record)
            if isinstance(slot.name, int):
                self.auto.append(stream)
            else:
                self.named.pop(slot.name, None)
                if len(self.named) >= MAX_STREAMS:
                    del self.named[next(iter(self.named))]  # the least recently used
                self.named[slot.name] = stream
        elif isinstance(slot.name, str):  # most recently used last
            self.named[slot.name] = self.named.pop(slot.name)
        stream.state, stream.last_timestep = state, slot.now
        stream.record.variants.append(variant)


def _stream_label(name: str | int) -> str:
    return name if isinstance(name, str) else ("auto" if name == 0 else f"auto{name + 1}")


class RunHistory:
    """The last ``HISTORY`` run records of a denoiser, from every thread."""

    def __init__(self):
        self._records: deque[RunRecord] = deque(maxlen=HISTORY)
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)

    def new_run(self) -> int:
        with self._lock:
            return next(self._numbers)

    def add(self, record: RunRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[RunRecord]:
        """Copies of the records, oldest first."""
        with self._lock:
            return [RunRecord(r.run, r.stream, r.batch, list(r.variants)) for r in self._records]
