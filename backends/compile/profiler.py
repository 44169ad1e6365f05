"""`switchyard profile`: measures every servable variant of every model on each
hardware class of the fleet, and stores the figures next to the variant
(`profile.json`) as the router's prior and the workers' choice of default.

A hardware class is measured the way its worker runs: in its own process,
pinned to as many cores as the class has threads, with that many runtime
threads, plus the class's emulated service delay. Each measurement runs the
variant's adapter directly (service time, no network), one call at a time, at
each batch size.

A variant is measured as a worker loads it: through `backends.runtimes.loader`, from
the bytes checked against its manifest, so a variant whose artifacts are outside its
folder or not what the manifest hashed is refused here too (its measurement fails
naming why).

Imports no grpc, no generated protobuf and nothing from the gateway; runtimes only
through their loader.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from backends.profiles import Profile, ProfileEntry, read_profile, write_profile
from backends.protocol.tensors import TensorSpec
from backends.repository import ModelRepository, Variant
from backends.runtimes.base import Array

DEFAULT_BATCH_SIZES = (1, 8, 32)


@dataclass(frozen=True, slots=True)
class HardwareClass:
    """What a fleet's launched worker stands for."""

    name: str
    threads: int
    emulated_latency_ms: float = 0.0


def batch_inputs(samples: dict[str, Array], batch_size: int) -> dict[str, Array]:
    """`batch_size` rows cycled from the sample inputs."""
    out = {}
    for name, array in samples.items():
        reps = -(-batch_size // len(array))
        out[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:batch_size])
    return out


def first_input(samples: dict[str, Array], inputs: Sequence[TensorSpec]) -> dict[str, Array]:
    """An unbatched model's first sample: its rows are whole inputs, stacked on a
    leading axis (an array of the input's own rank is one input)."""
    ranks = {spec.name: len(spec.shape) for spec in inputs}
    return {
        name: array[0] if array.ndim == ranks.get(name, array.ndim) + 1 else array
        for name, array in samples.items()
    }


def time_runs(
    run: Callable[[], object],
    runs: int,
    delay_ms: float = 0.0,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Times `run` up to `runs` calls, one at a time, each in ms plus `delay_ms` (an
    emulated service delay); with `budget_s`, stops once that much time has passed
    (the first call is always timed)."""
    times_ms: list[float] = []
    began = clock()
    while len(times_ms) < runs:
        start = clock()
        run()
        end = clock()
        times_ms.append((end - start) * 1000 + delay_ms)
        if budget_s is not None and end - began >= budget_s:
            break
    return times_ms


def figures(times_ms: Sequence[float], batch_size: int) -> dict[str, float]:
    """A profile entry's figures (p50, p99, throughput, runs) from timed calls."""
    ordered = sorted(times_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "batch_size": batch_size,
        "p50_ms": statistics.median(ordered),
        "p99_ms": p99,
        "throughput_per_s": batch_size * 1000 / statistics.fmean(ordered),
        "runs": len(ordered),
    }


def measure(
    variant_dir: Path, threads: int, batch_sizes: Sequence[int], runs: int, delay_ms: float
) -> list[dict[str, float]]:
    """Runs in the measuring process: loads the variant (its artifacts checked against
    the manifest; ManifestError otherwise), times each batch size."""
    from backends.runtimes.loader import load_adapter

    repository = ModelRepository(variant_dir.parent.parent.parent)
    variant = repository.read_variant(variant_dir.parent.parent.name, variant_dir)
    adapter = load_adapter(variant, threads)
    samples = dict(np.load(repository.root / variant.model / "samples" / "inputs.npz"))
    outputs = [s.name for s in adapter.outputs]
    measured = []
    for batch_size in batch_sizes:
        if variant.manifest.max_batch_size == 0 and batch_size > 1:
            continue
        feed = (
            first_input(samples, adapter.inputs)
            if variant.manifest.max_batch_size == 0
            else batch_inputs(samples, batch_size)
        )
        for _ in range(3):
            adapter.run(feed, outputs)
        times_ms = time_runs(partial(adapter.run, feed, outputs), runs, delay_ms)
        measured.append(figures(times_ms, batch_size))
    return measured


def measure_in_process(
    variant: Variant, hardware: HardwareClass, batch_sizes: Sequence[int], runs: int
) -> list[ProfileEntry]:
    """Measures `variant` as `hardware` runs it, in a pinned process of its own."""
    command = [
        sys.executable,
        "-m",
        "backends.compile.profiler",
        "measure",
        str(variant.directory),
        "--threads",
        str(hardware.threads),
        "--runs",
        str(runs),
        "--delay-ms",
        str(hardware.emulated_latency_ms),
        "--batch-sizes",
        *map(str, batch_sizes),
    ]
    env = {
        **os.environ,
        "TVM_NUM_THREADS": str(hardware.threads),
        "OMP_NUM_THREADS": str(hardware.threads),
    }
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            proc.stderr.strip().splitlines()[-1] if proc.stderr else "measure failed"
        )
    return [
        ProfileEntry(
            hardware_class=hardware.name,
            threads=hardware.threads,
            emulated_latency_ms=hardware.emulated_latency_ms,
            **figures,
        )
        for figures in json.loads(proc.stdout.strip().splitlines()[-1])
    ]


def record(variant: Variant, entries: list[ProfileEntry]) -> Profile:
    """Replaces the variant's entries for these hardware classes, keeping the rest."""
    classes = {e.hardware_class for e in entries}
    existing = read_profile(variant)
    kept = [e for e in (existing.entries if existing else []) if e.hardware_class not in classes]
    profile = Profile(model=variant.model, variant=variant.name, entries=kept + entries)
    write_profile(variant.directory, profile)
    return profile


def _pin(threads: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(cpus[:threads]))


def main(argv: Sequence[str] | None = None) -> int:
    """The measuring process (`python -m backends.compile.profiler measure ...`)."""
    parser = argparse.ArgumentParser(prog="backends.compile.profiler")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("variant_dir", type=Path)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--runs", type=int, default=50)
    m.add_argument("--delay-ms", type=float, default=0.0)
    m.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    args = parser.parse_args(argv)
    _pin(args.threads)
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    figures = measure(args.variant_dir, args.threads, args.batch_sizes, args.runs, args.delay_ms)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
