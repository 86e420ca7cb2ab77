"""Measure several partitions of one model on the same inputs, against pure Caffe.

Each partition is built on the one loaded ``CaffeModel`` (weights are read once), run
once to build its engines (that time is reported apart: it is paid once per process),
then timed after warm-up. Accuracy is always against pure Caffe on the same inputs,
because matching Caffe is what the user came for; speed without it means nothing.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..api import HybridNet
from ..errors import OptionError
from ..metrics import OutputDifference
from ..model.caffe_model import CaffeModel
from ..partition.partitioner import TENSORRT
from ..report.partition_report import boundaries, coverage
from .partition_spec import PartitionSpec
from .timing import Timing, time_calls

if TYPE_CHECKING:
    from ..executor.engine_choice import CpuSettings


@dataclass
class PartitionResult:
    """What one partition does on the inputs: its shape, its speed and its error."""
    spec: PartitionSpec
    batch: int
    segments: int
    tensorrt_segments: int
    boundaries: int
    boundary_bytes_per_image: int
    layer_share: float
    flop_share: float
    setup_s: float
    accuracy: list[OutputDifference]
    tolerance: float
    timing: Optional[Timing] = None  # None: refused, outputs beyond the tolerance
    notes: list[str] = field(default_factory=list)
    #: A reduced-precision variant of the partition ("INT8 entropy", "FP16"); "" for FP32.
    variant: str = ""

    @property
    def label(self) -> str:
        return self.spec.label + (f" [{self.variant}]" if self.variant else "")

    @property
    def detections_differ(self) -> Optional[int]:
        """SSD detections found on one side only (Caffe's or the hybrid's), near-ties not counted, or None."""
        counts = [a.detections.real_lone_rows for a in self.accuracy if a.detections is not None]
        return sum(counts) if counts else None

    @property
    def within(self) -> bool:
        """Every output within the tolerance (relative L2) of pure Caffe's."""
        return within(self.accuracy, self.tolerance)

    @property
    def max_abs(self) -> float:
        return max((a.max_abs for a in self.accuracy), default=0.0)

    @property
    def rel_l2(self) -> float:
        return max((a.rel_l2 for a in self.accuracy), default=0.0)

    @property
    def top1(self) -> Optional[float]:
        agreements = [a.top1_agreement for a in self.accuracy if a.top1_agreement is not None]
        return min(agreements) if agreements else None


def within(accuracy: Sequence[OutputDifference], tolerance: float) -> bool:
    return all(a.within(tolerance) for a in accuracy)


def open_partition(model: CaffeModel, spec: PartitionSpec, *, engine: str = "auto",
                   outputs: Sequence[str] = (), cpu_settings: Optional["CpuSettings"] = None) -> HybridNet:
    """The hybrid for ``spec`` on an already loaded model, with the spec's engine if it names
    one, else ``engine``; a bad fallback name names the spec."""
    try:
        return HybridNet(model, engine=spec.engine or engine, profile=spec.profile,
                         min_segment_size=spec.min_segment_size, fallback=spec.fallback, outputs=outputs,
                         cpu_settings=cpu_settings, keep_logits=True)
    except OptionError as exc:
        raise OptionError(f"partition {spec.label}: {exc}") from None


def measure_partition(net: HybridNet, spec: PartitionSpec, inputs: Mapping[str, np.ndarray],
                      reference: Mapping[str, np.ndarray], *, tolerance: float, runs: int, warmup: int,
                      tick: Optional[Callable[[], None]] = None,
                      detection_tolerance: Optional[float] = None) -> PartitionResult:
    """Build (first run), check against ``reference`` (pure Caffe's ``reference_values``: the
    outputs and every Softmax's input), then, if within ``tolerance`` (infinite: always),
    time ``net`` on ``inputs``. Detections are matched within ``detection_tolerance``
    (default ``tolerance``)."""
    batch = next(iter(inputs.values())).shape[0]
    values = list(net.checked_values())
    if spec.pure_caffe:
        run: Callable[[], dict[str, np.ndarray]] = lambda: net.run_caffe(inputs)
        checked = lambda: net.run_caffe_values(inputs, values)
    else:
        run = lambda: net.run(inputs)
        checked = lambda: net.run_values(inputs, values)
    start = time.perf_counter()
    accuracy = net.compare_values(checked(), reference,
                                  tolerance if detection_tolerance is None else detection_tolerance)
    setup = time.perf_counter() - start
    timed = math.isinf(tolerance) or within(accuracy, tolerance)
    timing = time_calls(run, runs, warmup, tick) if timed else None
    refused = []
    if timing is None:
        if any(a.detections is not None and not a.within(tolerance) for a in accuracy):
            refused.append(f"refused: detections differ from Caffe's (not only by near-ties within {tolerance:g}); "
                           "not timed")
        else:
            why = "".join(f" ({a.name}: {a.note})" for a in accuracy if a.note)
            refused.append(f"refused: outputs differ from Caffe's by relative L2 "
                           f"{max(a.rel_l2 for a in accuracy):.3g} > {tolerance:g}{why}; not timed")
    if spec.pure_caffe:
        layers = len(net.graph.compute_layers())
        return PartitionResult(spec, batch, 1, 0, 0, 0, 0.0, 0.0, setup, accuracy, tolerance, timing,
                               [f"{layers} layers in one Caffe net", *refused])
    part = net.partition  # after the first run: engines that refused layers may have re-cut it
    cov = coverage(part)
    bounds = boundaries(part)
    notes = [se.fallback_note for se in net.segment_engines if se.fallback_note]
    notes += [f"{a.name}: {a.detections.summary()}" for a in accuracy if a.detections and a.detections.diffs]
    notes += refused
    notes += [f"segment {se.segment.id}: chose {se.choice_note}" for se in net.segment_engines if se.choice_note]
    return PartitionResult(
        spec, batch, len(part.segments), sum(s.backend == TENSORRT for s in part.segments), len(bounds),
        sum(b["bytes_per_image"] for b in bounds), cov.layer_share, cov.flop_share, setup, accuracy, tolerance,
        timing, notes)


def compare_partitions(model: CaffeModel, specs: Sequence[PartitionSpec], inputs: Mapping[str, np.ndarray],
                       *, engine: str = "auto", outputs: Sequence[str] = (), tolerance: float = 1e-4,
                       runs: int = 20, warmup: int = 3, tick: Optional[Callable[[], None]] = None,
                       cpu_settings: Optional["CpuSettings"] = None) -> list[PartitionResult]:
    """Every spec measured on ``inputs``; nets are opened one at a time (they hold engines and
    weights) and closed after their measurement. Specs are all checked before any is run."""
    nets = [open_partition(model, spec, engine=engine, outputs=outputs, cpu_settings=cpu_settings)
            for spec in specs]
    reference = nets[0].reference_values(inputs)
    results = []
    for spec, net in zip(specs, nets):
        with net:
            results.append(measure_partition(net, spec, inputs, reference, tolerance=tolerance, runs=runs,
                                             warmup=warmup, tick=tick))
    return results


def _caffe_median(results: Sequence[PartitionResult]) -> Optional[float]:
    return next((r.timing.median for r in results if r.spec.pure_caffe and r.timing), None)


def to_json(results: Sequence[PartitionResult], meta: Mapping[str, Any]) -> dict[str, Any]:
    caffe = _caffe_median(results)
    rows = []
    for r in results:
        t = r.timing
        rows.append({
            "spec": r.label, "batch": r.batch, "segments": r.segments,
            "tensorrt_segments": r.tensorrt_segments, "caffe_segments": r.segments - r.tensorrt_segments,
            "boundaries": r.boundaries, "boundary_bytes_per_image": r.boundary_bytes_per_image,
            "layer_share_tensorrt": round(r.layer_share, 4), "flop_share_tensorrt": round(r.flop_share, 4),
            "setup_s": round(r.setup_s, 4), "refused": t is None,
            "latency_median_ms": t.median * 1e3 if t else None, "latency_p90_ms": t.p90 * 1e3 if t else None,
            "throughput_items_per_s": t.throughput(r.batch) if t else None,
            "speedup_vs_caffe": caffe / t.median if t and caffe else None,
            "samples_ms": [x * 1e3 for x in t.samples] if t else [],
            "accuracy": [{"output": a.name, "max_abs": a.max_abs, "rel_l2": a.rel_l2,
                          "top1_agreement": a.top1_agreement,
                          **({"detections": a.detections.to_json()} if a.detections else {})} for a in r.accuracy],
            "within_tolerance": r.within, "notes": r.notes})
    tolerance = results[0].tolerance if results else None
    return {**meta, "tolerance_rel_l2": tolerance, "partitions": rows}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def to_text(results: Sequence[PartitionResult]) -> str:
    caffe = _caffe_median(results)
    detector = any(r.detections_differ is not None for r in results)
    rows = []
    for r in results:
        t = r.timing
        speed = ([f"{t.median * 1e3:.2f}", f"{t.p90 * 1e3:.2f}", f"{t.throughput(r.batch):.1f}",
                  f"{caffe / t.median:.2f}x" if caffe else "-"] if t else ["refused", "-", "-", "-"])
        rows.append([r.label, f"{r.segments} ({r.tensorrt_segments} trt)", str(r.boundaries),
                     f"{r.boundary_bytes_per_image / 1024:.1f}", f"{r.layer_share:.0%}", f"{r.flop_share:.1%}",
                     *speed, f"{r.max_abs:.2g}", f"{r.rel_l2:.2g}", "-" if r.top1 is None else f"{r.top1:.0%}"]
                    + ([str(r.detections_differ if r.detections_differ is not None else "-")] if detector else []))
    lines = _table(["partition", "segments", "bounds", "KiB/img", "layers", "FLOPs", "median ms", "p90 ms",
                    "items/s", "vs Caffe", "max abs", "rel L2", "top-1"] + (["det. differ"] if detector else []), rows)
    notes = [f"  {r.label}: {n}" for r in results for n in r.notes if not r.spec.pure_caffe]
    batch = results[0].batch if results else 0
    tolerance = results[0].tolerance if results else 0
    lines += ["", f"batch {batch}; layers/FLOPs: share on TensorRT; bounds: tensors handed between segments; "
                  f"error against pure Caffe on the same inputs (worst of the outputs and every Softmax input); "
                  f"partitions beyond relative L2 "
                  f"{tolerance:g} are refused, not timed"]
    if any(r.variant for r in results):
        lines.append("[...]: the partition with its TensorRT segments in that calibrated precision (on this "
                     "machine ONNX Runtime runs the same Q/DQ or FP16 ONNX), timed whatever its error")
    if notes:
        lines += ["notes:", *notes]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[PartitionResult], path: Any, title: str) -> None:
    """Median latency per partition with a whisker up to p90; refused partitions are drawn n/a."""
    from ..report.bar_chart import grouped_bar_chart
    labels = [r.label.replace(",", "\n") for r in results]
    name = "median latency (ms)"
    grouped_bar_chart(path, labels, {name: [r.timing.median * 1e3 if r.timing else None for r in results]},
                      errors={name: [(r.timing.p90 - r.timing.median) * 1e3 if r.timing else None
                                     for r in results]},
                      title=title, ylabel="ms per batch (whisker: p90)",
                      note="n/a: refused, outputs differ from Caffe's beyond the tolerance"
                      if any(r.timing is None for r in results) else "")
