"""Latency figures the way every report here takes them: warm-up runs first (engine set-up,
allocator growth and caches are not what a user waits for on every call), then the median
and 90th percentile of timed runs, so one scheduler hiccup moves neither."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed runs."""
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.samples, 90))

    def throughput(self, batch: int) -> float:
        """Items per second at the median latency."""
        return batch / self.median if self.median > 0 else float("inf")


def time_calls(call: Callable[[], object], runs: int, warmup: int,
               tick: Optional[Callable[[], None]] = None) -> Timing:
    """Call ``call`` ``warmup`` times untimed, then ``runs`` times timed; ``tick`` follows each
    call (a progress bar)."""
    if runs < 1 or warmup < 0:
        raise ValueError("need at least one timed run and no negative warm-up")
    for _ in range(warmup):
        call()
        if tick:
            tick()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
        if tick:
            tick()
    return Timing(tuple(samples))
