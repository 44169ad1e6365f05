"""The one definition of a latency percentile that Switchyard reports: the simulator's
p99, the load report's p50/p99/p99.9 and lag p99, and the benches' latencies are all
this statistic, so a simulated p99 and a live p99 can be compared.

The definition is nearest rank, which is numpy's `inverted_cdf`: the p-th percentile
of n samples is the smallest sample x with at least p% of the samples <= x, that is
the sample at rank ceil(p/100 x n) in ascending order. It is always a latency that
was measured, never an interpolation between two.

Pure: numpy only. Imports no grpc, no protobuf, no clock, no asyncio and no
randomness (the rule of gateway/routing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def percentile(values: Sequence[float] | npt.NDArray[np.floating], pct: float) -> float:
    """The nearest-rank `pct` percentile (0..100) of `values`, in any order: the
    smallest value with at least `pct`% of the values at or below it; nan when there
    are none."""
    if len(values) == 0:
        return math.nan
    return float(np.percentile(values, pct, method="inverted_cdf"))
