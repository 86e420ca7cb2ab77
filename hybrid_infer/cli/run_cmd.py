"""``hybrid-infer run``: run a model through the hybrid and show what came out."""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from ..api import HybridNet
from ..errors import InputError, OptionError
from ..executor.engine_factory import ENGINES
from ..inputs import Preprocessing, load_input, random_input
from ..metrics import compare_outputs
from ..partition.partitioner import TENSORRT
from .common import add_build_options, add_model_options, open_net, require_weights, write_atomically


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model (TensorRT/ONNX Runtime + Caffe) on inputs",
                       description="Run a Caffe model through hybrid_infer and print its outputs.")
    add_model_options(p)
    p.add_argument("--input", action="extend", nargs="+", default=[], metavar="[NAME=]FILE",
                   help="input blob from .npy arrays or images; several files of one input form a "
                        "batch; FILE alone feeds the only input")
    p.add_argument("--batch", type=int, help="repeat the inputs to this batch size")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="engine for supported segments (auto: TensorRT if it can run here, else ONNX Runtime)")
    p.add_argument("-o", "--output", type=Path, help="save outputs to FILE.npz")
    p.add_argument("--check", action="store_true", help="also run pure Caffe and report the difference")
    p.add_argument("--tolerance", type=float, default=1e-4, help="relative L2 limit for --check (1e-4)")
    p.add_argument("--labels", type=Path, help="class names, one per line, for classifier outputs")
    p.add_argument("--top", type=int, default=5, help="classes to show per image (5)")
    prep = p.add_argument_group("image preprocessing: value = (pixel - mean[c]) * scale, pixels 0..255")
    prep.add_argument("--scale", type=float, default=1.0)
    prep.add_argument("--mean", type=float, nargs="+", default=[], help="one value, or one per channel")
    prep.add_argument("--channel-order", choices=("bgr", "rgb"), default="bgr",
                      help="channel order the model expects (Caffe models: usually bgr)")
    prep.add_argument("--resize", metavar="HxW", help="resize images to HxW (default: the input's size)")
    add_build_options(p)
    p.set_defaults(func=run)


def _preprocessing(args: argparse.Namespace) -> Preprocessing:
    resize = None
    if args.resize:
        try:
            h, w = (int(x) for x in args.resize.lower().split("x"))
        except ValueError:
            raise OptionError(f"--resize {args.resize}: expected HxW, e.g. 224x224") from None
        resize = (h, w)
    return Preprocessing(args.scale, tuple(args.mean), args.channel_order, resize)


def gather_inputs(net: HybridNet, specs: list[str], prep: Preprocessing,
                  batch: int | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Inputs by blob name, plus the file names per batch item (for printing)."""
    shapes = net.input_shapes()
    files: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            if len(shapes) != 1:
                raise OptionError(f"--input {spec}: this model has inputs {', '.join(shapes)}; write NAME=FILE")
            name, file = next(iter(shapes)), spec
        if name not in shapes:
            raise InputError(f"--input {spec}: '{name}' is not an input of {net.model.prototxt}; "
                             f"its inputs are {', '.join(shapes)}")
        files.setdefault(name, []).append(Path(file))
    inputs: dict[str, np.ndarray] = {}
    labels: list[str] = []
    for name, shape in shapes.items():
        if name in files:
            inputs[name] = np.concatenate([load_input(f, shape, prep) for f in files[name]])
            labels = labels or [f.name for f in files[name]]
        else:
            inputs[name] = random_input(shape)
            print(f"note: no --input for '{name}': using random normal values of shape {shape}")
    if batch:
        for name, array in inputs.items():
            reps = -(-batch // array.shape[0])
            inputs[name] = np.concatenate([array] * reps)[:batch]
        labels = (labels * batch)[:batch] if labels else []
    return inputs, labels


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
    inputs, labels = gather_inputs(net, args.input, _preprocessing(args), args.batch)
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
        print(f"  segment {se.segment.id}: {se.engine.kind:<11} {len(se.segment.layers):4d} layers "
              f"{times.get(se.segment.id, 0) * 1e3:8.2f} ms{note}")
    status = 0
    if args.check:
        reference = net.run_caffe(inputs)
        print("\ncheck against pure Caffe:")
        for row in compare_outputs(outputs, reference):
            ok = row.rel_l2 <= args.tolerance
            status |= 0 if ok else 1
            print(f"  {row.name}: max abs error {row.max_abs:.3g}, relative L2 {row.rel_l2:.3g} "
                  f"{'OK' if ok else 'ABOVE'} (tolerance {args.tolerance:g})"
                  + (f", top-1 agreement {row.top1_agreement:.0%}" if row.top1_agreement is not None else ""))
    if args.output:
        buffer = io.BytesIO()
        np.savez(buffer, **outputs)
        write_atomically(args.output, buffer.getvalue())
        print(f"wrote {args.output}")
    net.close()
    return status
