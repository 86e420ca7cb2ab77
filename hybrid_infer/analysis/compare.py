"""Measure several partitions of one model on the same inputs, against pure Caffe.

Each partition is built on the one loaded ``CaffeModel`` (weights are read once), run
once to build its engines (that time is reported apart: it is paid once per process),
then timed after warm-up. Accuracy is always against pure Caffe on the same inputs,
because matching Caffe is what the user came for; speed without it means nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..api import HybridNet
from ..errors import OptionError
from ..metrics import OutputDifference, compare_outputs
from ..model.caffe_model import CaffeModel
from ..partition.partitioner import TENSORRT
from ..report.partition_report import boundaries, coverage
from .partition_spec import PartitionSpec
from .timing import Timing, time_calls


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
    timing: Timing
    accuracy: list[OutputDifference]
    notes: list[str] = field(default_factory=list)

    def within(self, tolerance: float) -> bool:
        """Every output within ``tolerance`` relative L2 of pure Caffe's."""
        return all(a.rel_l2 <= tolerance for a in self.accuracy)

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


def open_partition(model: CaffeModel, spec: PartitionSpec, *, engine: str = "auto",
                   outputs: Sequence[str] = ()) -> HybridNet:
    """The hybrid for ``spec`` on an already loaded model; a bad fallback name names the spec."""
    try:
        return HybridNet(model, engine=engine, profile=spec.profile, min_segment_size=spec.min_segment_size,
                         fallback=spec.fallback, outputs=outputs)
    except OptionError as exc:
        raise OptionError(f"partition {spec.label}: {exc}") from None


def measure_partition(net: HybridNet, spec: PartitionSpec, inputs: Mapping[str, np.ndarray],
                      reference: Mapping[str, np.ndarray], *, runs: int, warmup: int,
                      tick: Optional[Callable[[], None]] = None) -> PartitionResult:
    """Build (first run), check against ``reference``, then time ``net`` on ``inputs``."""
    batch = next(iter(inputs.values())).shape[0]
    if spec.pure_caffe:
        run: Callable[[], dict[str, np.ndarray]] = lambda: net.run_caffe(inputs)
    else:
        run = lambda: net.run(inputs)
    start = time.perf_counter()
    outputs = run()
    setup = time.perf_counter() - start
    timing = time_calls(run, runs, warmup, tick)
    if spec.pure_caffe:
        layers = len(net.graph.compute_layers())
        return PartitionResult(spec, batch, 1, 0, 0, 0, 0.0, 0.0, setup, timing,
                               compare_outputs(outputs, reference), [f"{layers} layers in one Caffe net"])
    part = net.partition  # after the first run: engines that refused layers may have re-cut it
    cov = coverage(part)
    bounds = boundaries(part)
    notes = [se.fallback_note for se in net.segment_engines if se.fallback_note]
    return PartitionResult(
        spec, batch, len(part.segments), sum(s.backend == TENSORRT for s in part.segments), len(bounds),
        sum(b["bytes_per_image"] for b in bounds), cov.layer_share, cov.flop_share, setup, timing,
        compare_outputs(outputs, reference), notes)


def compare_partitions(model: CaffeModel, specs: Sequence[PartitionSpec], inputs: Mapping[str, np.ndarray],
                       *, engine: str = "auto", outputs: Sequence[str] = (), runs: int = 20,
                       warmup: int = 3, tick: Optional[Callable[[], None]] = None) -> list[PartitionResult]:
    """Every spec measured on ``inputs``; nets are opened one at a time (they hold engines and
    weights) and closed after their measurement. Specs are all checked before any is run."""
    nets = [open_partition(model, spec, engine=engine, outputs=outputs) for spec in specs]
    reference = nets[0].run_caffe(inputs)
    results = []
    for spec, net in zip(specs, nets):
        with net:
            results.append(measure_partition(net, spec, inputs, reference, runs=runs, warmup=warmup, tick=tick))
    return results


def _caffe_median(results: Sequence[PartitionResult]) -> Optional[float]:
    return next((r.timing.median for r in results if r.spec.pure_caffe), None)


def to_json(results: Sequence[PartitionResult], tolerance: float, meta: Mapping[str, Any]) -> dict[str, Any]:
    caffe = _caffe_median(results)
    return {**meta, "tolerance_rel_l2": tolerance, "partitions": [{
        "spec": r.spec.label, "batch": r.batch, "segments": r.segments,
        "tensorrt_segments": r.tensorrt_segments, "caffe_segments": r.segments - r.tensorrt_segments,
        "boundaries": r.boundaries, "boundary_bytes_per_image": r.boundary_bytes_per_image,
        "layer_share_tensorrt": round(r.layer_share, 4), "flop_share_tensorrt": round(r.flop_share, 4),
        "setup_s": round(r.setup_s, 4), "latency_median_ms": r.timing.median * 1e3,
        "latency_p90_ms": r.timing.p90 * 1e3, "throughput_items_per_s": r.timing.throughput(r.batch),
        "speedup_vs_caffe": (caffe / r.timing.median) if caffe else None,
        "samples_ms": [s * 1e3 for s in r.timing.samples],
        "accuracy": [{"output": a.name, "max_abs": a.max_abs, "rel_l2": a.rel_l2,
                      "top1_agreement": a.top1_agreement} for a in r.accuracy],
        "within_tolerance": r.within(tolerance), "notes": r.notes} for r in results]}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def to_text(results: Sequence[PartitionResult], tolerance: float) -> str:
    caffe = _caffe_median(results)
    rows = []
    for r in results:
        top1 = "-" if r.top1 is None else f"{r.top1:.0%}"
        rows.append([r.spec.label, f"{r.segments} ({r.tensorrt_segments} trt)", str(r.boundaries),
                     f"{r.boundary_bytes_per_image / 1024:.1f}", f"{r.layer_share:.0%}", f"{r.flop_share:.1%}",
                     f"{r.timing.median * 1e3:.2f}", f"{r.timing.p90 * 1e3:.2f}",
                     f"{r.timing.throughput(r.batch):.1f}",
                     f"{caffe / r.timing.median:.2f}x" if caffe else "-",
                     f"{r.max_abs:.2g}", f"{r.rel_l2:.2g}", top1,
                     "ok" if r.within(tolerance) else "ABOVE"])
    lines = _table(["partition", "segments", "bounds", "KiB/img", "layers", "FLOPs", "median ms", "p90 ms",
                    "items/s", "vs Caffe", "max abs", "rel L2", "top-1", f"rel L2<={tolerance:g}"], rows)
    notes = [f"  {r.spec.label}: {n}" for r in results for n in r.notes if not r.spec.pure_caffe]
    batch = results[0].batch if results else 0
    lines += ["", f"batch {batch}; layers/FLOPs: share on TensorRT; bounds: tensors handed between "
                  "segments; accuracy against pure Caffe on the same inputs (worst output)"]
    if notes:
        lines += ["notes:", *notes]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[PartitionResult], path: Any, title: str, tolerance: float) -> None:
    """Median latency per partition with a whisker up to p90; partitions above tolerance are red."""
    from ..report.bar_chart import grouped_bar_chart
    labels = [r.spec.label.replace(",", "\n") for r in results]
    grouped_bar_chart(path, labels, {"median latency (ms)": [r.timing.median * 1e3 for r in results]},
                      errors={"median latency (ms)": [(r.timing.p90 - r.timing.median) * 1e3 for r in results]},
                      title=title, ylabel="ms per batch (whisker: p90)",
                      note="; ".join(f"{r.spec.label}: above tolerance {tolerance:g}"
                                     for r in results if not r.within(tolerance)))
