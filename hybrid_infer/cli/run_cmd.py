"""``hybrid-infer run``: run a model through the hybrid and show what came out."""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

from ..api import HybridNet
from ..errors import InputError
from ..executor.engine_factory import ENGINES
from ..detections import DetectionComparison, detection_outputs, parse
from ..partition.partitioner import TENSORRT
from ..report import handoff_report
from ..files import check_not_read, check_output_path, write_atomically
from ..inputs import read_labels
from ..report.partition_report import user_lowerings
from .common import add_build_options, add_cpu_options, add_model_options, auto_min_segment_size, open_net
from .input_options import add_input_options, files_read, gather_inputs, preprocessing
from .option_types import float_type, int_type, output_file
from .precision_options import (add_precision_options, check_tolerance, precision_input_checks,
                                precision_lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model (TensorRT/ONNX Runtime + Caffe) on inputs",
                       description="Run a Caffe model through hybrid_infer and print its outputs.")
    add_model_options(p, auto_min=True)
    add_input_options(p)
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="engine for supported segments (auto: TensorRT if it can run here, else ONNX Runtime's "
                        "CUDA provider where onnxruntime-gpu and a GPU are present, else the faster of ONNX Runtime "
                        "and OpenVINO per segment, measured once and cached; caffe: Caffe too, on the same cut)")
    p.add_argument("--device", type=int_type(0), metavar="N",
                   help="run the Caffe segments on GPU N (needs the CUDA Caffe: scripts/setup.sh --cuda); "
                        "tensors then stay on the GPU between GPU engines")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="ONNX Runtime CUDA segments launch their kernels one by one instead of replaying a "
                        "captured CUDA graph (to measure what the graphs save)")
    p.add_argument("-o", "--output", type=output_file, help="save outputs to FILE.npz")
    p.add_argument("--check", action="store_true", help="also run pure Caffe and report the difference")
    p.add_argument("--tolerance", type=float_type(0), default=None,
                   help="relative L2 limit for --check (1e-4; with --calibration twice the error calibrate measured, "
                        "at least 1e-4); for DetectionOutput blobs the largest score or coordinate difference, and "
                        "the margin within which scores and thresholds count as equal")
    p.add_argument("--labels", type=Path, help="class names, one per line, for classifier outputs")
    p.add_argument("--top", type=int_type(1), default=5, help="classes to show per image (5)")
    add_cpu_options(p)
    add_build_options(p)
    add_precision_options(p)
    p.set_defaults(func=run)


def _classes(shape: tuple[int, ...]) -> int:
    """The number of classes of an output of ``shape`` that looks like per-item class scores
    (N x C, or N x C x 1 x 1), else 0."""
    classes = int(np.prod(shape[1:])) if len(shape) >= 2 else 0
    return classes if all(d == 1 for d in shape[2:]) and 1 < classes <= 100000 else 0


def _check_labels(names: list[str], path: Path, net: HybridNet) -> None:
    """Refuse a --labels file whose number of names fits none of the classifier outputs."""
    classes = {blob: _classes(net.graph.values[net.graph.value_of_blob(blob)].shape) for blob in net.output_blobs}
    counts = {blob: n for blob, n in classes.items() if n}
    if counts and len(names) not in counts.values():
        listing = ", ".join(f"'{blob}' has {n}" for blob, n in counts.items())
        raise InputError(f"--labels {path}: holds {len(names)} class names, but {listing} classes; give one name per "
                         "line, one line per class")


def _describe_output(name: str, array: np.ndarray, labels: list[str], names: list[str], top: int) -> str:
    out = io.StringIO()
    if array.size == 0:
        return f"{name}: shape {tuple(array.shape)}, empty"
    flat = array.reshape(array.shape[0], -1) if array.ndim >= 2 else array.reshape(1, -1)
    looks_like_scores = bool(_classes(array.shape))
    print(f"{name}: shape {tuple(array.shape)}, min {array.min():.4g}, max {array.max():.4g}", file=out)
    if looks_like_scores:
        for i, row in enumerate(flat):
            best = np.argsort(-row, kind="stable")[:top]
            desc = ", ".join(f"{names[c] if c < len(names) else c} ({row[c]:.4f})" for c in best)
            print(f"  [{i}]{' ' + labels[i] if i < len(labels) else ''}: {desc}", file=out)
    return out.getvalue().rstrip()


def _describe_detections(name: str, array: np.ndarray, top: int) -> str:
    """A DetectionOutput blob: its rows per image, the ``top`` highest-scoring of each."""
    found = parse(array)
    lines = [f"{name}: shape {tuple(array.shape)}, {len(found)} detection(s) [image, label, score, xmin, ymin, xmax, ymax]"]
    for image in sorted({d.image for d in found}):
        mine = sorted((d for d in found if d.image == image), key=lambda d: -d.score)
        lines += [f"  [{image}] label {d.label} score {d.score:.4f} box ({', '.join(f'{v:.4f}' for v in d.box)})"
                  for d in mine[:top]]
        if len(mine) > top:
            lines.append(f"  [{image}] ... {len(mine) - top} more")
    return "\n".join(lines)


def _print_detection_check(name: str, found: DetectionComparison, ok: bool, limit: int = 20) -> None:
    print(f"  {name}: {found.summary()} {'OK' if ok else 'DIFFERENT'} (tolerance {found.tolerance:g})")
    # the differences no near-equal number explains first: they are the ones that matter
    for diff in (found.real + [d for d in found.diffs if d not in found.real])[:limit]:
        print(f"    {diff.describe()}")
    if len(found.diffs) > limit:
        print(f"    ... {len(found.diffs) - limit} more")


def run(args: argparse.Namespace) -> int:
    if args.output:
        check_output_path(args.output, "-o")
        check_not_read(args.output, "-o", files_read(args))
    if args.labels:
        read_labels(args.labels)  # a bad file is reported before the model is loaded
    net = open_net(args, engine=args.engine, batch=args.batch or 1)
    prep = preprocessing(args)
    precision_notes = precision_input_checks(net, prep, args.input)  # refuses other preprocessing, before running
    inputs, labels = gather_inputs(net, args.input, prep, args.batch)
    for note in precision_notes:  # (inputs outside the calibrated range: net.run logs a warning)
        print(note, file=sys.stderr)
    args.tolerance, why_tolerance = check_tolerance(net, args.tolerance)
    tolerance = args.tolerance
    net = auto_min_segment_size(net, args, inputs, engine=args.engine, batch=args.batch or 1)
    class_names = read_labels(args.labels) if args.labels else []
    if args.labels:
        _check_labels(class_names, args.labels, net)
    start = time.perf_counter()
    outputs = net.run(inputs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    outputs = net.run(inputs)
    again = time.perf_counter() - start
    detections = detection_outputs(net.graph)
    for name, array in outputs.items():
        print(_describe_detections(name, array, args.top) if name in detections
              else _describe_output(name, array, labels, class_names, args.top))
    print(f"\n{len(net.partition.segments)} segment(s); first run {first * 1e3:.1f} ms "
          f"(includes engine set-up), second run {again * 1e3:.1f} ms")
    trt_kinds = sorted({se.engine.kind for se in net.segment_engines if se.segment.backend == TENSORRT})
    if trt_kinds:
        print(f"  TensorRT segments ran with {', '.join(trt_kinds)} ({net.engine_reason})")
    if net.precision is not None:
        print("\n".join(precision_lines(net)))
    times = net.segment_times()
    for se in net.segment_engines:
        note = f"  (fell back: {se.fallback_note})" if se.fallback_note else ""
        note += f"  (chose {se.choice_note})" if se.choice_note else ""
        if se.engine.kind == "onnxruntime-cuda":
            note += f"  ({se.engine.cuda_graph_note or 'CUDA graph, one per batch size'})"
        print(f"  segment {se.segment.id}: {se.engine.kind:<16} {len(se.segment.layers):4d} layers "
              f"{times.get(se.segment.id, 0) * 1e3:8.2f} ms{note}")
    if net.gpu is not None:
        print(f"  Caffe segments ran on GPU {net.gpu.index} ({net.gpu.name})")
    for row in user_lowerings(net.partition):
        if row["layers"]:
            print(f"  {row['target']} lowered by {row['function']} ({row['origin']}): {', '.join(row['layers'])}")
    print("\nhand-offs of the second run:\n" + handoff_report.to_text(net.handoffs()), end="")
    status = 0
    reduced = [f"segment {se.segment.id} ({se.engine.kind}, {se.engine.precision.upper()})"
               for se in net.segment_engines if getattr(se.engine, "precision", "f32") != "f32"]
    if args.check or reduced:
        # A CPU engine's reduced precision (OpenVINO BF16) is always measured; only --check judges it.
        result = net.check(inputs, tolerance)
        status = 0 if result.ok or not args.check else 1
        compared = ", ".join(f"'{name}'" for name in result.softmax_inputs.values())
        if why_tolerance:
            print(f"\n{why_tolerance}", end="")
        where = f"reduced precision: {', '.join(reduced)}; " if reduced else ""
        print(f"\n{where}{'check against' if args.check else 'error against'} pure Caffe: the outputs"
              + (f", and the input of every Softmax ({compared}), whose saturated probabilities would hide errors"
                 if compared else "") + ":")
        for row in result.rows:
            if row.detections is not None:
                _print_detection_check(row.name, row.detections, row.within(tolerance))
                continue
            role = f" (input of Softmax '{result.softmax_inputs[row.name]}')" if row.name in result.softmax_inputs else ""
            verdict = (f" {'OK' if row.rel_l2 <= tolerance else 'ABOVE'} (tolerance {tolerance:g})"
                       if args.check else "")
            print(f"  {row.name}{role}: max abs error {row.max_abs:.3g}, relative L2 {row.rel_l2:.3g}{verdict}"
                  + (f", top-1 agreement {row.top1_agreement:.0%}" if row.top1_agreement is not None else "")
                  + (f", {row.nonfinite} value(s) NaN or Inf on one side only" if row.nonfinite else "")
                  + (f" ({row.note})" if row.note and not row.nonfinite else ""))
    if args.output:
        buffer = io.BytesIO()
        np.savez(buffer, **outputs)
        write_atomically(args.output, buffer.getvalue(), option="-o")
        print(f"wrote {args.output}")
    net.close()
    return status
