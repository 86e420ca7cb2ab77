"""``hybrid-infer calibrate``: calibrate reduced precision on the user's inputs, write CALIB."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..api import HybridNet
from ..detections import detection_outputs
from ..errors import OptionError
from ..files import check_not_read, check_output_path
from ..partition.partitioner import TENSORRT
from ..precision.calibrate import batches_of, calibrate, fp16_overflow, tensorrt_segments
from ..precision.calibration_file import METHODS, PRECISIONS
from ..precision.plan import PrecisionPlan, quantizable_layers
from ..precision.sensitivity import error_of, parse_target, search
from ..report.progress import Progress
from .common import add_model_options, open_net, require_weights
from .input_options import add_input_options, files_read, gather_inputs, preprocessing
from .option_types import int_type, output_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate INT8 (or FP16) for the TensorRT segments on your inputs",
        description="Run the FP32 hybrid on calibration inputs (preprocessed as for run), record the "
                    "ranges of every TensorRT segment's tensors, and write a calibration file for "
                    "run/build/compare --calibration. With --accuracy-target, keep the most sensitive "
                    "layers in FP32 until the target against Caffe FP32 is met.")
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
                   help="keep the most sensitive layers in FP32 until rel_l2=X (worst output's relative L2 "
                        "against Caffe FP32), top1=P (top-1 agreement) or detections=N (SSD detections "
                        "differing from Caffe's) is met on the evaluation inputs")
    p.add_argument("--eval-input", action="extend", nargs="+", default=[], metavar="[NAME=]FILE",
                   help="inputs for the accuracy check and --accuracy-target (default: the calibration inputs)")
    p.add_argument("--runs", type=int_type(1), default=5, help="timed runs per configuration in the search (5)")
    p.add_argument("-o", "--output", type=output_file, help="calibration file to write (default MODEL.PRECISION.calib.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_weights(args)
    if not args.input:
        raise OptionError("calibrate needs --input: the images or .npy arrays to calibrate on "
                          "(a few hundred representative inputs; preprocessing as for run)")
    target = parse_target(args.accuracy_target) if args.accuracy_target else None
    output = args.output or Path(f"{args.model.stem}.{args.precision}.calib.json").absolute()
    check_output_path(output, "-o")
    check_not_read(output, "-o", files_read(args))
    net = open_net(args, engine="auto", batch=args.calibration_batch)
    prep = preprocessing(args)
    inputs, _ = gather_inputs(net, args.input, prep, args.batch)
    batches = batches_of(inputs, args.calibration_batch)
    count = next(iter(inputs.values())).shape[0]
    label = args.precision.upper() + (f" {args.method}" if args.precision == "int8" else "")
    print(f"calibrating {label} on {count} input(s) in {len(batches)} batch(es)", file=sys.stderr)
    start = time.perf_counter()
    progress = Progress(len(batches), "calibrate")
    try:
        calibration = calibrate(
            net, batches, precision=args.precision, method=args.method, keep_fp32=args.keep_fp32,
            partition_options={"profile": args.profile, "min_segment_size": net.partition.min_segment_size,
                               "fallback": list(args.fallback), "outputs": list(args.output_blob)},
            input_note={"files": len(args.input), "preprocessing": vars(prep)}, tick=progress.tick)
    finally:
        progress.close()
    segments = tensorrt_segments(net)
    print(f"{len(segments)} TensorRT segment(s), {sum(len(s.ranges) for s in calibration.segments)} tensor "
          f"ranges, {time.perf_counter() - start:.1f} s")
    if args.precision == "fp16":
        overflow = fp16_overflow(calibration)
        if overflow:
            print(f"warning: {len(overflow)} tensor(s) exceed FP16's range (65504) on these inputs, e.g. "
                  f"{', '.join(overflow[:5])}; keep their layers in FP32 (--keep-fp32)")
    evaluation, _ = gather_inputs(net, args.eval_input, prep, None) if args.eval_input else (inputs, None)
    reference = net.run_caffe(evaluation)
    make_net = _net_factory(net, args)
    plan = PrecisionPlan.create(calibration, net.model, net.graph)
    with make_net(plan) as reduced:
        error = error_of(reduced.run(evaluation), reference, detection_outputs(net.graph))
        engines = sorted({se.engine.kind for se in reduced.segment_engines if se.segment.backend == TENSORRT})
    print(f"{label} ({', '.join(engines)}) against Caffe FP32 on {next(iter(evaluation.values())).shape[0]} "
          f"input(s): relative L2 {error['rel_l2']:.3g}"
          + (f", top-1 agreement {error['top1']:.1%}" if error["top1"] is not None else "")
          + (f", {error['detections']:g} detection(s) differ" if error["detections"] is not None else ""))
    if target is not None:
        layers = [name for s in segments for name in s.layers]
        progress = Progress(2 * len(quantizable_layers(net.graph, layers)) + 1, "sensitivity")  # at most
        try:
            report = search(plan, make_net, evaluation, reference, target, layers=layers, runs=args.runs,
                            tick=progress.tick)
        finally:
            progress.close()
        print(report.to_text())
        calibration.keep_fp32 = sorted(set(calibration.keep_fp32) | set(report.kept))
        calibration.sensitivity = json.loads(json.dumps(report.to_json()))
    net.close()
    calibration.save(output)
    print(f"wrote {output}")
    return 0 if target is None or (calibration.sensitivity or {}).get("met") else 1


def _net_factory(net: HybridNet, args: argparse.Namespace) -> Callable[[Optional[PrecisionPlan]], HybridNet]:
    """Hybrids on the same loaded model and partition options, with a given precision plan."""
    def make(plan: Optional[PrecisionPlan]) -> HybridNet:
        return HybridNet(net.model, profile=args.profile, min_segment_size=net.partition.min_segment_size,
                         fallback=args.fallback, outputs=args.output_blob, calibration=plan)
    return make
