"""The models a worker serves: its settings, which variants of each model it may serve
(the manifest's accuracy check, the CPU's flags, the precisions allowed, the artifacts
matching their sha256: a bad variant is refused alone), each loaded behind its own
batcher, and the default variant per model: the fastest by the variants' profiles for
this worker's hardware class and threads, else by a short measurement when it starts.

Imports the repository, the runtimes' loader and the batcher, and generated protobuf
for the metadata, configuration and statistics a served model describes itself with;
no grpc, nothing from the gateway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backends.compile.cpu import cpu_flags, int8_dot_products, missing_flags
from backends.compile.profiler import batch_inputs, figures, first_input, time_runs
from backends.compile.variants import ORT_FP32
from backends.profiles import (
    ProfileEntry,
    profile_entry,
    profile_row_fraction,
    read_profile,
)
from backends.protocol.codec import (
    Signature,
    add_config_tensors,
    metadata_message,
)
from backends.protocol.errors import ModelNotFound
from backends.protocol.parameters import (
    MEASURED_AT_START,
    PROFILE_PARAMETER,
    PROFILED,
    VariantProfile,
    profile_parameter,
)
from backends.protocol.tensors import NUMPY_DTYPES
from backends.repository import ManifestError, ModelRepository, Variant
from backends.runtimes.base import Array, RuntimeAdapter
from backends.runtimes.loader import load_adapter
from backends.worker.batching import DEFAULT_MAX_QUEUE, Batcher, RunFn, Slots
from protos import inference_pb2 as pb

log = logging.getLogger("switchyard.backend")


MODEL_VERSION = "1"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a worker runs."""

    repository: Path
    threads: int = 1
    """Threads for inference: the runtime's intra-op pool, so the worker stands for an
    instance with this many cores; and its slots: at most this many batches run at
    once across its models and variants, the one due first next (batching.Slots)."""
    hardware_class: str = "cpu"
    models: tuple[str, ...] = ()
    """Models to serve; empty: every model in the repository."""
    emulate_latency_ms: float = 0.0
    """Added per row of every execution, standing for slower hardware (reported in
    metadata). Such a worker merges no requests unless `max_batch_rows` or `batching`
    asks it to: emulated rows gain nothing from a batch, and a merged batch holds its
    first request for the others' rows."""
    max_queue_delay_us: int = 0
    """How long a batch may wait for more requests; 0 batches only what is already queued."""
    max_batch_rows: int = 0
    """Most rows dynamic batching merges into one execution (1: no merging); 0: the
    variant's max_batch_size."""
    batching: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """Per model: (max_batch_rows, max_queue_delay_us) in place of the two above."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    """Most requests waiting per model variant; one more is shed at once (RESOURCE_EXHAUSTED)."""
    max_concurrent_rpcs: int | None = None
    """Most RPCs in progress at once, health checks included; past it gRPC answers
    RESOURCE_EXHAUSTED. None: server.default_max_concurrent_rpcs (of `max_queue` and
    the models served)."""
    precisions: tuple[str, ...] = ()
    """Precisions this worker may serve (fp32, fp16, int8); empty: any whose accuracy
    check passed. Variants that failed their check are never served."""
    measure_at_start: bool = False
    """Time each loaded variant that has no profile for this hardware class and thread
    count right after its warm-up (batch 1, at most MEASURE_RUNS runs or MEASURE_BUDGET_S
    per variant, plus `emulate_latency_ms`), to choose the default variant and advertise
    as its profile; nothing is written to the repository. Off here, so a worker built in
    process (tests, benches) keeps a default that no timing decides; `switchyard backend`
    turns it on unless given `--no-measure-at-start`."""
    inline_below_us: int | None = None
    """A variant whose recent runs average under this many microseconds runs on the
    event loop, not handed to an inference thread and back (see backends.worker.batching):
    less CPU and latency per request, but no overlap of compute with the gRPC work, and
    for a variant that batches, smaller batches under concurrent load (measured in
    docs/bring-your-own-model.md). 0: every run in a thread. None: `inline_below_us_for`
    decides per variant (inline below AUTO_INLINE_BELOW_US where nothing is lost). Never
    with `emulate_latency_ms`."""


AUTO_INLINE_BELOW_US = 1000
"""The inline threshold a worker takes by itself (`inline_below_us_for`): a run this short
holds back the requests that arrive meanwhile for at most this long."""


def inline_below_us_for(settings: WorkerSettings, batch_rows: int) -> int:
    """The inline threshold of a variant that merges up to `batch_rows` rows per run (0
    or 1: none): the worker's `inline_below_us` where set; else AUTO_INLINE_BELOW_US
    for a variant that merges nothing on a one-thread worker, where a thread of its own
    gains nothing (no batch forms while it runs, and the one slot takes one run at a
    time) but costs a hand-off and a wake-up each way, which on tinyconv took a third
    of the worker's CPU per request (BENCHMARKS.md, "The gateway's hop"); else 0. Always
    0 with emulated latency (a sleep must not stop the loop)."""
    if settings.emulate_latency_ms > 0:
        return 0
    if settings.inline_below_us is not None:
        return settings.inline_below_us
    return AUTO_INLINE_BELOW_US if settings.threads == 1 and batch_rows <= 1 else 0


def model_batching(settings: WorkerSettings, model: str) -> tuple[int, int]:
    """(max_batch_rows, max_queue_delay_us) for `model`: its own, else the worker's
    (one row, no merging, for an emulated worker that sets neither)."""
    rows = settings.max_batch_rows
    if rows <= 0 and settings.emulate_latency_ms > 0:
        rows = 1
    return settings.batching.get(model, (rows, settings.max_queue_delay_us))


def parse_batching(items: Sequence[str]) -> dict[str, tuple[int, int]]:
    """`MODEL=ROWS:DELAY_US` items (`--batching resnet=8:2000`); ValueError naming a bad one."""
    out = {}
    for item in items:
        model, _, spec = item.partition("=")
        rows, _, delay = spec.partition(":")
        if not model or not rows.isdigit() or not delay.isdigit():
            raise ValueError(
                f"--batching {item!r}: expected MODEL=ROWS:DELAY_US, e.g. resnet=8:2000"
            )
        out[model] = (int(rows), int(delay))
    return out


@dataclass(frozen=True, slots=True)
class LoadedVariant:
    """One variant loaded in this worker, behind its own batcher."""

    variant: Variant
    adapter: RuntimeAdapter
    batcher: Batcher

    @property
    def name(self) -> str:
        return self.variant.name


class ServedModel:
    """One model as this worker serves it: its servable variants, one the default."""

    def __init__(
        self,
        loaded: dict[str, LoadedVariant],
        default: str,
        settings: WorkerSettings,
        measured: Mapping[str, ProfileEntry] | None = None,
    ) -> None:
        first = loaded[default]
        self.name = first.variant.model
        self.variants = loaded
        self.default = default
        adapter = first.adapter
        self.signature = Signature(
            adapter.inputs, adapter.outputs, first.variant.manifest.max_batch_size
        )
        self.output_specs = {s.name: s for s in adapter.outputs}
        self.settings = settings
        self.measured = dict(measured or {})
        """Figures measured at start, by variant (those without a profile here)."""
        self.success = [0, 0]  # count, ns
        self.decode_ns = 0
        self.encode_ns = 0
        self.fail = [0, 0]
        self.last_inference_ms = 0

    def check_version(self, version: str) -> None:
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(
                f"model {self.name!r} has no version {version!r} (versions: {MODEL_VERSION})"
            )

    def choose(self, requested: object) -> LoadedVariant:
        """The variant a request names (`switchyard_variant`), else the default."""
        if requested is None:
            return self.variants[self.default]
        chosen = self.variants.get(str(requested))
        if chosen is None:
            raise ModelNotFound(
                f"model {self.name!r} has no variant {requested!r} on this backend "
                f"(serves: {', '.join(sorted(self.variants))})"
            )
        return chosen

    def metadata(self) -> pb.ModelMetadataResponse:
        return metadata_message(
            self.name,
            [MODEL_VERSION],
            self.platform,
            self.signature.inputs,
            self.signature.outputs,
        )

    @property
    def platform(self) -> str:
        runtime = self.variants[self.default].variant.manifest.runtime
        return "onnxruntime_onnx" if runtime == "onnxruntime" else runtime

    def config(self) -> pb.ModelConfig:
        batch = self.signature.max_batch_size
        manifest = self.variants[self.default].variant.manifest
        cfg = pb.ModelConfig(
            name=self.name, platform=self.platform, backend=manifest.runtime, max_batch_size=batch
        )
        add_config_tensors(cfg, self.signature.inputs, self.signature.outputs)
        cfg.instance_group.add(name=f"{self.name}_0", count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
        if batch > 0:
            _, delay_us = model_batching(self.settings, self.name)
            cfg.dynamic_batching.max_queue_delay_microseconds = delay_us
        params = {
            "switchyard_variant": manifest.variant,
            "switchyard_variants": ",".join(sorted(self.variants)),
            "switchyard_runtime": f"{manifest.runtime} {manifest.runtime_version}",
            "switchyard_target": manifest.target,
            "switchyard_precision": manifest.precision,
            "switchyard_hardware_class": self.settings.hardware_class,
            "switchyard_threads": str(self.settings.threads),
            "switchyard_emulated_latency_ms": str(self.settings.emulate_latency_ms),
            # Its queue takes requests by priority, then earliest deadline first, the
            # deadline given by `switchyard_due_us` (the gateway then sends it).
            "switchyard_queue": "deadline",
        }
        profile = self.profile()
        if profile:
            params[PROFILE_PARAMETER] = profile
        for key, value in params.items():
            cfg.parameters[key].string_value = value
        return cfg

    def profile(self) -> str:
        """The `switchyard_profile` parameter (backends.protocol.parameters): each
        variant's p50 and p99 at batch 1 on this worker's hardware class and threads,
        and its row fraction (what each extra row of a batch adds, as a fraction of one
        row's time): the gateway's latency prior. From the variant's profile, adjusted
        for this worker's emulated delay, else from the worker's measurement at start
        (marked `source: start`, no row fraction); empty when no variant has either."""
        profiles, sources = [], {}
        for name, loaded in sorted(self.variants.items()):
            figure = variant_figure(loaded.variant, self.settings, self.measured.get(name))
            if figure is None:
                continue
            profiles.append(VariantProfile(name, figure.p50_ms, figure.p99_ms, figure.row_fraction))
            sources[name] = figure.source
        return profile_parameter(profiles, sources) if profiles else ""

    def statistics(self) -> pb.ModelStatistics:
        executions = inferences = queue_ns = compute_ns = 0
        by_size: dict[int, list[int]] = {}
        for loaded in self.variants.values():
            stats = loaded.batcher.stats
            executions += stats.executions
            inferences += stats.inferences
            queue_ns += stats.queue_ns
            compute_ns += stats.compute_ns
            for size, (count, ns) in stats.by_size.items():
                total = by_size.setdefault(size, [0, 0])
                total[0] += count
                total[1] += ns
        reply = pb.ModelStatistics(
            name=self.name,
            version=MODEL_VERSION,
            last_inference=self.last_inference_ms,
            inference_count=inferences,
            execution_count=executions,
        )
        inf = reply.inference_stats
        inf.success.count, inf.success.ns = self.success
        inf.fail.count, inf.fail.ns = self.fail
        inf.queue.count, inf.queue.ns = self.success[0], queue_ns
        # Equal counts for the three compute phases, as Triton reports (perf_analyzer checks).
        inf.compute_input.count, inf.compute_input.ns = executions, self.decode_ns
        inf.compute_infer.count, inf.compute_infer.ns = executions, compute_ns
        inf.compute_output.count, inf.compute_output.ns = executions, self.encode_ns
        for size, (count, ns) in sorted(by_size.items()):
            batch = reply.batch_stats.add(batch_size=size)
            batch.compute_infer.count, batch.compute_infer.ns = count, ns
        return reply

    def batchers(self) -> list[Batcher]:
        return [loaded.batcher for loaded in self.variants.values()]


def servable(variant: Variant, settings: WorkerSettings, flags: frozenset[str]) -> str | None:
    """Why this worker must not serve `variant` (its policy, then its artifacts' check),
    or None when it may."""
    reason = refused_by_policy(variant, settings, flags)
    if reason is not None:
        return reason
    try:
        variant.verify()
    except ManifestError as exc:
        return str(exc)
    return None


def refused_by_policy(
    variant: Variant, settings: WorkerSettings, flags: frozenset[str]
) -> str | None:
    """Why this worker's settings and CPU rule `variant` out (accuracy, precision,
    device, CPU flags), or None; its artifacts are checked when it loads."""
    manifest = variant.manifest
    accuracy = manifest.accuracy
    if accuracy is not None and not accuracy.passed:
        missed = []
        if accuracy.max_abs_diff > accuracy.tolerance_max_abs_diff:
            missed.append(
                f"max |diff| {accuracy.max_abs_diff:.3g} > {accuracy.tolerance_max_abs_diff:g}"
            )
        top1, floor = accuracy.top1_agreement, accuracy.min_top1_agreement
        if top1 is not None and floor is not None and top1 < floor:
            missed.append(f"top-1 agreement {top1:.1%} < {floor:.1%}")
        return f"failed its accuracy check ({'; '.join(missed) or 'marked failed'})"
    if accuracy is None and manifest.precision != "fp32":
        return "was never checked against the fp32 reference"
    if (
        accuracy is not None
        and accuracy.int8_dot == "exact"
        and int8_dot_products(flags) == "saturating"
    ):
        return (
            "passed its accuracy check on a CPU whose int8 dot products are exact (VNNI); "
            "this CPU has no VNNI, where ONNX Runtime's int8 kernels saturate and the "
            "outputs differ: compile it on this hardware to check it here"
        )
    if settings.precisions and manifest.precision not in settings.precisions:
        return f"precision {manifest.precision} is not allowed here"
    if manifest.device != "cpu":
        return f"needs a {manifest.device} device"
    missing = missing_flags(manifest.required_cpu_flags, flags)
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


@dataclass(frozen=True, slots=True)
class VariantFigure:
    """A variant's service time at batch 1 on this worker, and where it came from."""

    p50_ms: float
    p99_ms: float
    row_fraction: float | None
    """What each extra row adds, as a fraction of one row's time; None: not known."""
    source: str
    """PROFILED (its profile.json) or MEASURED_AT_START."""
    runs: int
    """How many timed runs the figures stand on."""


def variant_figure(
    variant: Variant, settings: WorkerSettings, measured: ProfileEntry | None
) -> VariantFigure | None:
    """`variant`'s figure on this worker: its profile for this hardware class and thread
    count (shifted by the difference between this worker's emulated delay and the
    profile's), else `measured` (its measurement at start), else None."""
    figure = profiled_figure(variant, settings)
    if figure is None and measured is not None:
        figure = measured_figure(measured)
    return figure


def profiled_figure(variant: Variant, settings: WorkerSettings) -> VariantFigure | None:
    """`variant`'s profile for this hardware class and thread count, shifted by the
    difference between this worker's emulated delay and the profile's; None without."""
    profile = read_profile(variant)
    entry = (
        None
        if profile is None
        else profile_entry(profile, settings.hardware_class, settings.threads)
    )
    if profile is not None and entry is not None:
        shift = settings.emulate_latency_ms - entry.emulated_latency_ms
        rows = profile_row_fraction(profile, settings.hardware_class, settings.threads, shift)
        return VariantFigure(entry.p50_ms + shift, entry.p99_ms + shift, rows, PROFILED, entry.runs)
    return None


def measured_figure(measured: ProfileEntry) -> VariantFigure:
    """A measurement at start as a figure (batch 1 only: no row fraction)."""
    return VariantFigure(measured.p50_ms, measured.p99_ms, None, MEASURED_AT_START, measured.runs)


def default_variant(variants: Mapping[str, Variant], figures: Mapping[str, VariantFigure]) -> str:
    """The fastest variant by its figure (profiled, else measured at start); without
    any figure, ONNX Runtime fp32, else the first by name. Untuned TVM is never the
    default while another variant is served."""
    candidates = {
        name: variant
        for name, variant in variants.items()
        if variant.manifest.tuning is None or variant.manifest.tuning.tuned
    } or dict(variants)
    timed = {name: figures[name].p50_ms for name in candidates if name in figures}
    if timed:
        return min(timed, key=lambda n: (timed[n], n))
    if ORT_FP32 in candidates:
        return ORT_FP32
    return sorted(candidates)[0]


def default_reason(
    default: str, figures: Mapping[str, VariantFigure], settings: WorkerSettings
) -> str:
    """Where the default's figure came from, for the worker's log."""
    figure = figures.get(default)
    threads = f"{settings.threads} thread" + ("" if settings.threads == 1 else "s")
    if figure is None:
        return "no variant profiled or measured here: the fallback"
    if figure.source == PROFILED:
        where = f"profile for {settings.hardware_class}/{threads}"
    else:
        where = f"measured at start, {figure.runs} runs"
    return f"p50 {figure.p50_ms:.3g} ms at batch 1, {where}"


MEASURE_RUNS = 20
"""Most timed runs of one variant when a worker measures it at start."""

MEASURE_BUDGET_S = 0.5
"""Longest a worker spends timing one variant at start (the first run always counts)."""


def measure_variant(
    variant: Variant, adapter: RuntimeAdapter, feed: Mapping[str, Array], settings: WorkerSettings
) -> ProfileEntry | None:
    """Times `variant` as this worker runs it, at batch 1 on its warm-up row `feed`
    (`warm_up_feed`): at most MEASURE_RUNS runs or MEASURE_BUDGET_S, each plus the
    worker's emulated delay, as `switchyard profile` adds it. None, logged, when the
    run fails."""
    outputs = [s.name for s in adapter.outputs]
    try:
        times_ms = time_runs(
            lambda: adapter.run(feed, outputs),
            MEASURE_RUNS,
            settings.emulate_latency_ms,
            MEASURE_BUDGET_S,
        )
    except Exception as exc:  # the runtime's own error, whatever its type
        log.warning(
            "model %s: variant %s not measured at start: %s", variant.model, variant.name, exc
        )
        return None
    return ProfileEntry(
        hardware_class=settings.hardware_class,
        threads=settings.threads,
        emulated_latency_ms=settings.emulate_latency_ms,
        **figures(times_ms, 1),
    )


def load_models(settings: WorkerSettings, executor: ThreadPoolExecutor) -> dict[str, ServedModel]:
    """Loads every servable variant of each model; each variant refused (its manifest,
    its artifacts' check, this worker's policy, its runtime) is logged with why, and the
    model's other variants still load. A model none of whose variants load is not served."""
    repository = ModelRepository(settings.repository)
    names = list(settings.models) or repository.models()
    flags = cpu_flags()
    served: dict[str, ServedModel] = {}
    slots = Slots(settings.threads)
    for name in names:
        scan = repository.scan(name)
        for refused in scan.refused:
            log.warning("model %s: variant %s not served: %s", name, refused.name, refused.reason)
        loaded: dict[str, LoadedVariant] = {}
        measured: dict[str, ProfileEntry] = {}
        figures_here: dict[str, VariantFigure] = {}
        for variant in scan.variants:
            feed: dict[str, Array] = {}
            reason = refused_by_policy(variant, settings, flags)
            if reason is None:
                try:
                    # Checks the artifacts against the manifest and loads those bytes.
                    adapter = load_adapter(variant, settings.threads)
                except ManifestError as exc:
                    reason = str(exc)
                except Exception as exc:  # a runtime missing here, a broken artifact
                    reason = f"does not load: {exc}"
                else:
                    feed, from_samples = warm_up_feed(variant, adapter, repository.root)
                    reason = warm_up(variant, adapter, feed, from_samples)
            if reason is not None:
                log.warning("model %s: variant %s not served: %s", name, variant.name, reason)
                continue
            run: RunFn = adapter.run
            if settings.emulate_latency_ms > 0:
                run = _with_delay(adapter.run, settings.emulate_latency_ms / 1000.0)
            rows, delay_us = model_batching(settings, name)
            batch_rows = _batch_rows(variant.manifest.max_batch_size, rows)
            batcher = Batcher(
                run,
                executor,
                [s.name for s in adapter.outputs],
                batch_rows,
                delay_us / 1e6,
                settings.max_queue,
                f"model {name!r} (variant {variant.name})",
                inline_below_us=inline_below_us_for(settings, batch_rows),
                slots=slots,
            )
            loaded[variant.name] = LoadedVariant(variant, adapter, batcher)
            figure = profiled_figure(variant, settings)
            if figure is None and settings.measure_at_start and feed:
                entry = measure_variant(variant, adapter, feed, settings)
                if entry is not None:
                    measured[variant.name] = entry
                    figure = measured_figure(entry)
            if figure is not None:
                figures_here[variant.name] = figure
        if not loaded:
            log.error("model %s not served: no servable variant in %s", name, settings.repository)
            continue
        default = default_variant({n: lv.variant for n, lv in loaded.items()}, figures_here)
        served[name] = ServedModel(loaded, default, settings, measured)
        log.info(
            "serving %s as %s (%s; variants: %s)",
            name,
            default,
            default_reason(default, figures_here, settings),
            ", ".join(sorted(loaded)),
        )
    return served


WARM_UP_RUNS = 2


def warm_up(
    variant: Variant, adapter: RuntimeAdapter, feed: Mapping[str, Array], from_samples: bool
) -> str | None:
    """Runs the variant WARM_UP_RUNS times on one row, `feed` (`warm_up_feed`), before
    the worker serves it, so no caller (nor the gateway's first latency sample after a
    restart) pays for the runtime's first run (ONNX Runtime's first run of a small model
    is ~70x its steady state here). Returns why the variant must not be served when it
    fails on its own stored sample (`from_samples`), else None (a failure on zeros is
    logged only)."""
    if not feed:
        log.info(
            "model %s: variant %s not warmed up: no sample for a BYTES input",
            variant.model,
            variant.name,
        )
        return None
    outputs = [s.name for s in adapter.outputs]
    try:
        for _ in range(WARM_UP_RUNS):
            adapter.run(feed, outputs)
    except Exception as exc:  # the runtime's own error, whatever its type
        if from_samples:
            return f"fails on its stored sample: {exc}"
        log.warning(
            "model %s: variant %s warm-up on zeros failed: %s", variant.model, variant.name, exc
        )
    return None


def warm_up_feed(
    variant: Variant, adapter: RuntimeAdapter, root: Path
) -> tuple[dict[str, Array], bool]:
    """The row a variant is warmed up and measured on at start, and whether it is the
    model's first stored sample (True) or zeros of each input's shape, -1 as 1 (False);
    empty when neither can be made (a BYTES input without a stored sample)."""
    stored = root / variant.model / "samples" / "inputs.npz"
    feed: dict[str, Array] = {}
    batched = variant.manifest.max_batch_size > 0
    try:
        if stored.is_file():
            with np.load(stored) as data:
                samples = {spec.name: data[spec.name] for spec in adapter.inputs}
            feed = batch_inputs(samples, 1) if batched else first_input(samples, adapter.inputs)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("model %s: stored samples not usable for warm-up: %s", variant.model, exc)
        feed = {}
    if feed:
        return feed, True
    if any(spec.datatype == "BYTES" for spec in adapter.inputs):
        return {}, False
    zeros = {
        spec.name: np.zeros([d if d > 0 else 1 for d in spec.shape], NUMPY_DTYPES[spec.datatype])
        for spec in adapter.inputs
    }
    return zeros, False


def _batch_rows(max_batch_size: int, cap: int) -> int:
    """The rows dynamic batching may merge: the variant's limit, capped by the worker's."""
    if max_batch_size <= 0 or cap <= 0:
        return max_batch_size
    return min(max_batch_size, cap)


def _with_delay(run: RunFn, delay_s: float) -> RunFn:
    """`run`, plus `delay_s` per row of the batch: emulated hardware gains nothing
    from batching, so an emulated backend's capacity is what its delay says."""

    def delayed(inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        first = next(iter(inputs.values()), None)
        rows = first.shape[0] if first is not None and first.ndim else 1
        time.sleep(delay_s * max(1, rows))  # in a worker thread: occupies it as compute would
        return run(inputs, outputs)

    return delayed
