"""Step forwards of concurrent sampling runs, batched: the step engine for loops we do not own.

A diffusers pipeline runs its own denoising loop. To batch the steps of many pipeline calls
at once, each call runs in its own thread inside ``batcher.run()``; there, every step of a
diffopt denoiser hands its forward to the batcher (``runtime.denoiser.forwards_through``)
and waits. The batcher's thread gathers the waiting forwards and runs each group of the
same program (one call key: same resolution, prompt length and arguments) and the same
variant as one ``OptimizedDenoiser.step_many``, then wakes each caller with its own output
and state. Runs of other programs (another size or prompt length) are never mixed into a
forward, and nothing is padded: they form their own groups in the same tick.

A tick starts when every run that is stepping waits with its next forward, or ``linger_s``
after the first forward arrived (a run between steps, or encoding and decoding, does not
hold the others up longer). A run counts as stepping from its first forward until its
``expected_forwards`` (a hint: its step count) are done or it leaves.

A forward's result for one sample never depends on the others in it: a program that
quantizes with one scale per batch (``TemporalDifferencePass("dynamic")``) runs each
caller's forward alone; an adaptive schedule's probe already ran in the caller's step, for
that caller only. A failed forward raises in the callers it served, and the batcher goes on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from diffopt.runtime.denoiser import OptimizedDenoiser, forwards_through
from diffopt.serving.engine import batch_coupled_layers

logger = logging.getLogger("diffopt")
RECENT_FORWARDS = 1000


@dataclass(eq=False)
class BatchedRun:
    """One sampling run (a pipeline call in one thread) and how far it got."""

    expected_forwards: int | None
    forwards: int = 0
    rows: int = 0  # rows of its own forwards (0 before the first)
    batch_rows: list[int] = field(default_factory=list)  # rows of each forward it shared

    @property
    def stepping(self) -> bool:
        return self.forwards > 0 and (self.expected_forwards is None or self.forwards < self.expected_forwards)


@dataclass(eq=False)
class _Forward:
    """One run's forward, waiting for its tick."""

    run: BatchedRun
    denoiser: OptimizedDenoiser
    variant: str
    inputs: tuple[torch.Tensor, ...]
    state: tuple[torch.Tensor, ...]
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0])


class ForwardBatcher:
    """Batches the step forwards of the runs inside ``run()`` (see the module docstring)."""

    def __init__(self, max_batch: int = 32, linger_s: float = 0.01):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"ForwardBatcher: max_batch must be an int >= 1, found {max_batch!r}")
        if not isinstance(linger_s, (int, float)) or not 0 <= linger_s <= 10:
            raise ValueError(f"ForwardBatcher: linger_s must be a number of seconds in [0, 10], found {linger_s!r}")
        self.max_batch, self.linger_s = max_batch, float(linger_s)
        self._lock = threading.Condition()
        self._runs: set[BatchedRun] = set()
        self._waiting: list[_Forward] = []
        self._coupled: weakref.WeakKeyDictionary[OptimizedDenoiser, bool] = weakref.WeakKeyDictionary()  # runs alone?
        self.forwards: deque[tuple[str, int]] = deque(maxlen=RECENT_FORWARDS)  # (variant, rows) of recent forwards
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="diffopt-forward-batcher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def run(self, expected_forwards: int | None = None) -> Iterator[BatchedRun]:
        """One sampling run in this thread: its denoiser steps join the batcher's ticks. Yields
        its ``BatchedRun`` (forwards done, rows of each forward it shared)."""
        if self._stop.is_set():
            raise RuntimeError("ForwardBatcher: closed")
        run = BatchedRun(expected_forwards)
        with self._lock:
            self._runs.add(run)
        try:
            with forwards_through(lambda *forward: self._forward(run, *forward)):
                yield run
        finally:
            with self._lock:
                self._runs.discard(run)
                self._lock.notify_all()

    def close(self) -> None:
        """Stop the batcher's thread; forwards still waiting fail."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        self._thread.join(timeout=5)
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for forward in waiting:
            forward.error = RuntimeError("ForwardBatcher: closed while this forward waited")
            forward.done.set()

    def _forward(
        self, run: BatchedRun, denoiser: OptimizedDenoiser, variant: str, inputs: tuple, state: tuple
    ) -> tuple:
        forward = _Forward(run, denoiser, str(variant), tuple(inputs), tuple(state))
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("ForwardBatcher: closed")
            self._waiting.append(forward)
            self._lock.notify_all()
        forward.done.wait()
        if forward.error is not None:
            raise forward.error
        return forward.result

    # the batcher's thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._waiting:
                    self._lock.wait(timeout=0.05)
                    continue
                deadline = time.monotonic() + self.linger_s
                while not self._stop.is_set() and not self._everyone_waits() and time.monotonic() < deadline:
                    self._lock.wait(timeout=max(deadline - time.monotonic(), 0.0))
                tick, self._waiting = self._waiting, []
            try:
                self._tick(tick)
            except BaseException as error:  # a bug here must not leave callers waiting forever
                logger.exception("diffopt serving: a batched tick failed")
                for forward in tick:
                    if not forward.done.is_set():
                        forward.error = error
                        forward.done.set()

    def _everyone_waits(self) -> bool:
        waiting = {id(forward.run) for forward in self._waiting}
        return all(id(run) in waiting for run in self._runs if run.stepping)

    def _tick(self, tick: list[_Forward]) -> None:
        """Run ``tick``'s forwards, one ``step_many`` per program, variant and ``max_batch`` rows."""
        groups: dict[tuple[int, str], list[_Forward]] = {}
        for forward in tick:
            groups.setdefault((id(forward.denoiser), forward.variant), []).append(forward)
        for members in groups.values():
            for batch in self._batches(members):
                self._run_batch(batch)

    def _batches(self, members: list[_Forward]) -> Iterator[list[_Forward]]:
        denoiser = members[0].denoiser
        if denoiser not in self._coupled:
            self._coupled[denoiser] = bool(batch_coupled_layers(denoiser))
        if self._coupled[denoiser]:
            yield from ([forward] for forward in members)
            return
        batch: list[_Forward] = []
        for forward in members:
            if batch and sum(f.rows for f in batch) + forward.rows > self.max_batch:
                yield batch
                batch = []
            batch.append(forward)
        yield batch

    def _run_batch(self, batch: list[_Forward]) -> None:
        rows = sum(forward.rows for forward in batch)
        try:
            with torch.no_grad():
                results = batch[0].denoiser.step_many(batch[0].variant, [(f.inputs, f.state) for f in batch])
        except Exception as error:  # this forward's callers get the error; the batcher goes on
            for forward in batch:
                forward.error = error
                forward.done.set()
            return
        self.forwards.append((batch[0].variant, rows))
        for forward, result in zip(batch, results):
            forward.run.forwards += 1
            forward.run.rows = forward.rows
            forward.run.batch_rows.append(rows)
            forward.result = result
            forward.done.set()
