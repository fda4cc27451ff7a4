"""Admission to a step-batched engine under a latency SLO: start a request only when it and
the running ones are still expected to finish in time; refuse one that cannot.

Every running request's steps share the ticks, so each one admitted slows the others. The
cost model is fitted to the requests that finished: each gives its seconds per step (its
whole run, encoding and decoding included, over its steps) at the mean rows of the forwards
it shared; ``seconds per step = a + b * rows`` by least squares over the recent ones. A
request of ``steps`` steps that starts now with ``R`` rows running finishes in about
``steps * (a + b * R)``. A request waiting to start:

- starts when it would finish by its deadline (arrival + ``slo_s``) and no running request
  that can still make its own deadline would miss it;
- waits while that is not so (a request finishing wakes it);
- is refused (``Overloaded``) once it could not finish in time even alone, so the server's
  time goes to requests that can still make the SLO.

An idle engine starts any request (it delays no one, and its time keeps the model current:
a model made pessimistic by one slow run would otherwise refuse everything from then on).
Until requests have finished there is no model, and requests start. The model sees the
engine's time only: the time a request spends in HTTP and routing is the caller's margin
(give ``slo_s`` a little under the end-to-end SLO).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from diffopt.serving.engine import Overloaded
from diffopt.serving.forward_batcher import BatchedRun

RECHECK_S = 0.02  # a waiting request looks again this often (time alone can make it hopeless)
RECENT_RUNS = 30  # finished requests the cost model is fitted to
OUTLIER = 3.0  # a run this many times slower per step than the median is not fitted (a capture, a hiccup)


@dataclass(eq=False)
class _Admitted:
    deadline: float
    steps: int
    run: BatchedRun | None = None

    @property
    def rows(self) -> int:
        return max(self.run.rows if self.run is not None else 0, 1)

    @property
    def remaining(self) -> int:
        return max(self.steps - (self.run.forwards if self.run is not None else 0), 0)


class SloAdmission:
    """The admission gate of one engine (see the module docstring)."""

    def __init__(self, slo_s: float):
        if isinstance(slo_s, bool) or not isinstance(slo_s, (int, float)) or not 0 < slo_s < 3600:
            raise ValueError(f"SloAdmission: slo_s must be a number of seconds in (0, 3600), found {slo_s!r}")
        self.slo_s = float(slo_s)
        self._lock = threading.Condition()
        self._running: list[_Admitted] = []
        self._finished: deque[tuple[float, float]] = deque(maxlen=RECENT_RUNS)  # (mean rows, seconds per step)
        self.refused = 0

    @contextlib.contextmanager
    def slot(self, arrived: float, steps: int) -> Iterator[_Admitted]:
        """Wait until a request that arrived at ``arrived`` (``time.monotonic()``) with
        ``steps`` steps may start; yields its record (set its ``run`` once it runs). A run
        that ends normally joins the cost model."""
        admitted = _Admitted(arrived + self.slo_s, steps)
        with self._lock:
            while not self._may_start(admitted):
                self._lock.wait(timeout=RECHECK_S)
            self._running.append(admitted)
        started = time.monotonic()
        try:
            yield admitted
            run = admitted.run
            if run is not None and run.batch_rows and steps:
                self.observe(sum(run.batch_rows) / len(run.batch_rows), (time.monotonic() - started) / steps)
        finally:
            with self._lock:
                self._running.remove(admitted)
                self._lock.notify_all()

    def observe(self, mean_rows: float, seconds_per_step: float) -> None:
        """A finished request: the mean rows of the forwards it shared and its seconds per step."""
        with self._lock:
            self._finished.append((float(mean_rows), float(seconds_per_step)))

    def seconds_per_step(self, rows: float) -> float | None:
        """A step's expected seconds with ``rows`` rows running (None before any request finished).
        Runs slower than ``OUTLIER`` times the median (one that captured its program) are left out."""
        points = sorted(self._finished, key=lambda point: point[1])
        if not points:
            return None
        median = points[len(points) // 2][1]
        points = [point for point in points if point[1] <= OUTLIER * median]
        mean_rows = sum(r for r, _ in points) / len(points)
        mean_seconds = sum(s for _, s in points) / len(points)
        spread = sum((r - mean_rows) ** 2 for r, _ in points)
        slope = sum((r - mean_rows) * (s - mean_seconds) for r, s in points) / spread if spread else 0.0
        return max(mean_seconds + max(slope, 0.0) * (rows - mean_rows), min(s for _, s in points))

    def _may_start(self, candidate: _Admitted) -> bool:
        """Whether ``candidate`` starts now; raises ``Overloaded`` once it cannot make its deadline."""
        now = time.monotonic()
        alone = self.seconds_per_step(candidate.rows)
        if alone is None or not self._running:
            return True
        if now + candidate.steps * alone > candidate.deadline:
            self.refused += 1
            raise Overloaded(
                f"this request would not finish within the SLO of {self.slo_s:.3g} s at the current load: "
                f"try again later"
            )
        running_rows = sum(a.rows for a in self._running)
        before, after = self.seconds_per_step(running_rows), self.seconds_per_step(running_rows + candidate.rows)
        still_in_time = [a for a in self._running if now + a.remaining * before <= a.deadline]
        return now + candidate.steps * after <= candidate.deadline and all(
            now + a.remaining * after <= a.deadline for a in still_in_time
        )
