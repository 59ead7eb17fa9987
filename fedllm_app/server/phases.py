"""Wall and CPU seconds of the ServerApp's start-up, phase by phase, for the run's summary.

The ServerApp runs in a thread of Flower's simulation process (beside the simulation engine and Ray's
driver), so CPU is counted with :func:`time.thread_time`: the ServerApp thread's own CPU, meaningful on a
busy machine where wall times are not. ``summary.json``'s ``startup_phases`` holds what :class:`Phases`
recorded; ``benchmarks/startup_profile.py`` prints it beside the other processes' CPU.
"""

from __future__ import annotations

import time


class Phases:
    """Consecutive named phases, each with its wall seconds and this thread's CPU seconds.

    Parameters
    ----------
    started : float
        ``time.perf_counter()`` when the first phase began (the ServerApp's ``main``); CPU is counted from
        the creation of this object, and :attr:`cpu_before` holds what the thread spent before it (the
        ServerApp module's imports: the simulation imports it in this thread).
    """

    def __init__(self, started: float) -> None:
        self.cpu_before = time.thread_time()
        self._last = (started, self.cpu_before)
        self.seconds: dict[str, dict[str, float]] = {}

    def mark(self, name: str) -> None:
        """End phase ``name`` now (a repeated name adds to it); the next phase starts here."""
        now = (time.perf_counter(), time.thread_time())
        entry = self.seconds.setdefault(name, {"wall": 0.0, "cpu": 0.0})
        entry["wall"] += now[0] - self._last[0]
        entry["cpu"] += now[1] - self._last[1]
        self._last = now

    def summary(self) -> dict[str, dict[str, float] | float]:
        """The phases so far and ``cpu_before_main`` (the thread's CPU before the first phase), rounded to ms."""
        phases = {k: {m: round(s, 3) for m, s in v.items()} for k, v in self.seconds.items()}
        return {"cpu_before_main": round(self.cpu_before, 3), **phases}
