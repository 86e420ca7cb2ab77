"""``hybrid-infer calibrate``: calibrate reduced precision on the user's inputs, write CALIB."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..api import HybridNet
from ..errors import OptionError
from ..files import check_not_read, check_output_path
from ..partition.partitioner import TENSORRT
from ..precision.calibrate import batches_of, calibrate, check_finite, fp16_overflow, tensorrt_segments
from ..precision.calibration_file import METHODS, PRECISIONS, Calibration
from ..precision.checks import reads_images
from ..precision.plan import PrecisionPlan, quantizable_layers, resolve_layers
from ..precision.report import applied_lines
from ..precision.sensitivity import check_target, error_of, measuring_points, parse_target, search
from ..report.progress import Progress
from .common import add_model_options, open_net
from .input_options import add_input_options, files_read, gather_inputs, preprocessing
from .option_types import int_type, output_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate INT8 (or FP16) for the TensorRT segments on your inputs",
        description="Run the FP32 hybrid on calibration inputs (preprocessed as for run), record the "
                    "ranges of every TensorRT segment's tensors, and write a calibration file for "
                    "run/build/compare/export/diff --calibration. With --accuracy-target, keep the most "
                    "sensitive layers in FP32 until the target against Caffe FP32 is met.")
    add_model_options(p)
    add_input_options(p)
    p.add_argument("--precision", choices=PRECISIONS, default="int8",
                   help="int8 (Q/DQ, calibrated) or fp16 (default int8)")
    p.add_argument("--method", choices=METHODS, default="entropy",
                   help="INT8 range estimation (ONNX Runtime's calibrators; default entropy)")
    p.add_argument("--calibration-batch", type=int_type(1), default=8, metavar="N",
                   help="inputs per hybrid run while calibrating (default 8)")
    p.add_argument("--keep-fp32", nargs="+", default=[], metavar="NAME_OR_TYPE",
                   help="layers (names or types) that stay FP32; stored in the file")
    p.add_argument("--accuracy-target", metavar="METRIC=VALUE",
                   help="keep the most sensitive layers in FP32 until rel_l2=X (worst relative L2 of the "
                        "outputs and Softmax inputs against Caffe FP32), top1=P (top-1 agreement) or "
                        "detections=N (SSD detections differing from Caffe's) is met on the evaluation inputs")
    p.add_argument("--eval-input", action="extend", nargs="+", default=[], metavar="[NAME=]FILE",
                   help="inputs for the accuracy check and --accuracy-target (default: the calibration inputs)")
    p.add_argument("--runs", type=int_type(1), default=5, help="timed runs per configuration in the search (5)")
    p.add_argument("-o", "--output", type=output_file, help="calibration file to write (default MODEL.PRECISION.calib.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.input:
        raise OptionError("calibrate needs --input: the images or .npy arrays to calibrate on "
                          "(a few hundred representative inputs; preprocessing as for run)")
    target = parse_target(args.accuracy_target) if args.accuracy_target else None
    output = args.output or Path(f"{args.model.stem}.{args.precision}.calib.json").absolute()
    check_output_path(output, "-o")
    check_not_read(output, "-o", files_read(args))
    net = open_net(args, engine="auto", batch=args.calibration_batch)
    resolve_layers(net.graph, args.keep_fp32)
    if target is not None:
        check_target(target, net)
    prep = preprocessing(args)
    inputs, _ = gather_inputs(net, args.input, prep, None)
    count = next(iter(inputs.values())).shape[0]
    check_finite(inputs, "calibration input", f" of --input {' '.join(args.input)}")
    evaluation = net.check_inputs(gather_inputs(net, args.eval_input, prep, None)[0]) if args.eval_input else inputs
    _warn_about_the_set(args, count)
    batches = batches_of(inputs, args.calibration_batch)
    label = args.precision.upper() + (f" {args.method}" if args.precision == "int8" else "")
    print(f"calibrating {label} on {count} input(s) in {len(batches)} batch(es)", file=sys.stderr)
    start = time.perf_counter()
    images = reads_images(args.input)
    with _progress(len(batches), "calibrate") as tick, _searches() as search_tick:
        calibration = calibrate(
            net, batches, precision=args.precision, method=args.method, keep_fp32=args.keep_fp32,
            partition_options={"profile": args.profile, "min_segment_size": net.partition.min_segment_size,
                               "fallback": list(args.fallback), "outputs": list(args.output_blob)},
            input_note={"files": len(args.input), "preprocessing": vars(prep) if images else None},
            tick=tick, search_tick=search_tick)
    segments = tensorrt_segments(net)
    print(f"{len(segments)} TensorRT segment(s), {sum(len(s.ranges) for s in calibration.segments)} tensor "
          f"ranges, {time.perf_counter() - start:.1f} s")
    overflow = fp16_overflow(calibration) if args.precision == "fp16" else []
    if overflow:
        print(f"{len(overflow)} tensor(s) exceed FP16's range (65504) on these inputs, e.g. {', '.join(overflow[:5])}: "
              "the layers that write or read them stay FP32 (listed below), so nothing becomes inf")
    make_net = _net_factory(net, args)
    values = list(dict.fromkeys([*net.checked_values(), *measuring_points(net)]))
    reference = net.run_caffe_values(evaluation, values)
    plan = PrecisionPlan.create(calibration, net.model, net.graph)
    with make_net(plan) as reduced:
        error = error_of(reduced, reduced.run_values(evaluation, values), reference)
        engines = sorted({se.engine.kind for se in reduced.segment_engines if se.segment.backend == TENSORRT})
        details = applied_lines(reduced, integer_kernels=True)
    items = next(iter(evaluation.values())).shape[0]
    on = "evaluation inputs" if args.eval_input else "calibration inputs"
    print("\n".join(details))
    print(f"{label} ({', '.join(engines)}) against Caffe FP32 on {items} {on}: "
          + _error_text(error))
    calibration.accuracy = {**_json_safe(error), "inputs": items, "on": on, "engine": ", ".join(engines)}
    net.close()
    if target is not None:
        _search(calibration, plan, make_net, evaluation, reference, target, args,
                [name for s in segments for name in s.layers])
    calibration.save(output)
    print(f"wrote {output}")
    return 0 if target is None or (calibration.sensitivity or {}).get("met") else 1


def _error_text(error: dict) -> str:
    """The measured error as calibrate and run print it."""
    parts = [f"relative L2 {error['rel_l2']:.3g} (worst of the outputs and Softmax inputs)"
             if error.get("rel_l2") is not None else "relative L2 -"]
    if error.get("top1") is not None:
        parts.append(f"top-1 agreement {error['top1']:.1%}")
    if error.get("detections") is not None:
        parts.append(f"{error['detections']:g} detection(s) found on one side only")
    return ", ".join(parts)


def _json_safe(error: dict) -> dict:
    """Measured errors for the file: an infinite or NaN one (overflow, NaN outputs) becomes
    null, with ``nonfinite`` saying so."""
    safe = {k: (v if v is None or math.isfinite(v) else None) for k, v in error.items()}
    return {**safe, **({"nonfinite": True} if safe != error else {})}


def _search(calibration: Calibration, plan: PrecisionPlan, make_net: Callable[[Optional[PrecisionPlan]], HybridNet],
            evaluation: dict, reference: dict, target, args: argparse.Namespace, layers: list[str]) -> None:
    """The sensitivity search; its report and the layers it kept go into ``calibration``."""
    candidates = quantizable_layers(plan.graph, layers)
    with _progress(2 * len(candidates) + 2, "sensitivity") as tick:  # at most
        report = search(plan, make_net, evaluation, reference, target, layers=layers, runs=args.runs, tick=tick)
    print(report.to_text())
    calibration.keep_fp32 = sorted(set(calibration.keep_fp32) | set(report.kept))
    calibration.sensitivity = json.loads(json.dumps(report.to_json()))
    if report.met and report.steps:
        best = [s for s in report.steps if not s.skipped][-1]
        calibration.accuracy = {**(calibration.accuracy or {}), **_json_safe(best.error)}


def _warn_about_the_set(args: argparse.Namespace, count: int) -> None:
    if count == 1:
        print("warning: calibrating on a single input: ranges from one image rarely hold for others (the entropy "
              "method clips harder still); use a few hundred representative inputs", file=sys.stderr)
    if args.batch and args.batch > count:
        print(f"warning: --batch {args.batch} would repeat the {count} input(s); repeated items add nothing to "
              "calibration, so calibrate uses each once (--calibration-batch sets the run size)", file=sys.stderr)


@contextlib.contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[], None]]:
    progress = Progress(total, label)
    try:
        yield progress.tick
    finally:
        progress.close()


@contextlib.contextmanager
def _searches() -> Iterator[Callable[[int], Callable[[], None]]]:
    """``search_tick`` for ``calibrate``: one progress bar per segment's entropy threshold search."""
    bars: list[Progress] = []

    def start(tensors: int) -> Callable[[], None]:
        if bars:
            bars[-1].close()
        bars.append(Progress(tensors, "entropy thresholds (KL search, per tensor)"))
        return bars[-1].tick
    try:
        yield start
    finally:
        if bars:
            bars[-1].close()


def _net_factory(net: HybridNet, args: argparse.Namespace) -> Callable[[Optional[PrecisionPlan]], HybridNet]:
    """Hybrids on the same loaded model and partition options, with a given precision plan and
    the checked values (outputs and Softmax inputs) among their segment outputs."""
    def make(plan: Optional[PrecisionPlan]) -> HybridNet:
        return HybridNet(net.model, profile=args.profile, min_segment_size=net.partition.min_segment_size,
                         fallback=args.fallback, outputs=args.output_blob, calibration=plan, keep_logits=True)
    return make

