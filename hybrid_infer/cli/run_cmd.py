"""``hybrid-infer run``: run a model through the hybrid and show what came out."""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from ..executor.engine_factory import ENGINES
from ..partition.partitioner import TENSORRT
from ..report import handoff_report
from ..report.partition_report import user_lowerings
from .common import (add_build_options, add_cpu_options, add_model_options, auto_min_segment_size, open_net,
                     require_weights, write_atomically)
from .input_options import add_input_options, gather_inputs, preprocessing


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model (TensorRT/ONNX Runtime + Caffe) on inputs",
                       description="Run a Caffe model through hybrid_infer and print its outputs.")
    add_model_options(p, auto_min=True)
    add_input_options(p)
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="engine for supported segments (auto: TensorRT if it can run here, else the faster of "
                        "ONNX Runtime and OpenVINO per segment, measured once and cached; caffe: Caffe too, "
                        "on the same cut)")
    p.add_argument("--device", type=int, metavar="N",
                   help="run the Caffe segments on GPU N (needs the CUDA Caffe: scripts/setup.sh --cuda); "
                        "tensors then stay on the GPU between GPU engines")
    p.add_argument("-o", "--output", type=Path, help="save outputs to FILE.npz")
    p.add_argument("--check", action="store_true", help="also run pure Caffe and report the difference")
    p.add_argument("--tolerance", type=float, default=1e-4, help="relative L2 limit for --check (1e-4)")
    p.add_argument("--labels", type=Path, help="class names, one per line, for classifier outputs")
    p.add_argument("--top", type=int, default=5, help="classes to show per image (5)")
    add_cpu_options(p)
    add_build_options(p)
    p.set_defaults(func=run)


def _describe_output(name: str, array: np.ndarray, labels: list[str], names: list[str], top: int) -> str:
    out = io.StringIO()
    flat = array.reshape(array.shape[0], -1) if array.ndim >= 2 else array.reshape(1, -1)
    looks_like_scores = array.ndim >= 2 and all(d == 1 for d in array.shape[2:]) and 1 < flat.shape[1] <= 100000
    print(f"{name}: shape {tuple(array.shape)}, min {array.min():.4g}, max {array.max():.4g}", file=out)
    if looks_like_scores:
        for i, row in enumerate(flat):
            best = np.argsort(-row, kind="stable")[:top]
            desc = ", ".join(f"{names[c] if c < len(names) else c} ({row[c]:.4f})" for c in best)
            print(f"  [{i}]{' ' + labels[i] if i < len(labels) else ''}: {desc}", file=out)
    return out.getvalue().rstrip()


def run(args: argparse.Namespace) -> int:
    require_weights(args)
    net = open_net(args, engine=args.engine, batch=args.batch or 1)
    inputs, labels = gather_inputs(net, args.input, preprocessing(args), args.batch)
    net = auto_min_segment_size(net, args, inputs, engine=args.engine, batch=args.batch or 1)
    class_names = args.labels.read_text().split("\n") if args.labels else []
    start = time.perf_counter()
    outputs = net.run(inputs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    outputs = net.run(inputs)
    again = time.perf_counter() - start
    for name, array in outputs.items():
        print(_describe_output(name, array, labels, [c.strip() for c in class_names], args.top))
    print(f"\n{len(net.partition.segments)} segment(s); first run {first * 1e3:.1f} ms "
          f"(includes engine set-up), second run {again * 1e3:.1f} ms")
    trt_kinds = sorted({se.engine.kind for se in net.segment_engines if se.segment.backend == TENSORRT})
    if trt_kinds:
        print(f"  TensorRT segments ran with {', '.join(trt_kinds)} ({net.engine_reason})")
    times = net.segment_times()
    for se in net.segment_engines:
        note = f"  (fell back: {se.fallback_note})" if se.fallback_note else ""
        note += f"  (chose {se.choice_note})" if se.choice_note else ""
        print(f"  segment {se.segment.id}: {se.engine.kind:<11} {len(se.segment.layers):4d} layers "
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
        # Reduced precision is always measured against Caffe; only --check judges it.
        result = net.check(inputs, args.tolerance)
        status = 0 if result.ok or not args.check else 1
        where = f"reduced precision: {', '.join(reduced)}; " if reduced else ""
        print(f"\n{where}{'check against' if args.check else 'error against'} pure Caffe (the outputs, and the "
              "input of each final Softmax, whose saturated probabilities would hide errors):")
        for row in result.rows:
            role = f" (input of Softmax '{result.softmax_inputs[row.name]}')" if row.name in result.softmax_inputs else ""
            verdict = (f" {'OK' if row.rel_l2 <= args.tolerance else 'ABOVE'} (tolerance {args.tolerance:g})"
                       if args.check else "")
            print(f"  {row.name}{role}: max abs error {row.max_abs:.3g}, relative L2 {row.rel_l2:.3g}{verdict}"
                  + (f", top-1 agreement {row.top1_agreement:.0%}" if row.top1_agreement is not None else ""))
    if args.output:
        buffer = io.BytesIO()
        np.savez(buffer, **outputs)
        write_atomically(args.output, buffer.getvalue())
        print(f"wrote {args.output}")
    net.close()
    return status
