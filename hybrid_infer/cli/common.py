"""Options shared by sub-commands, and turning them into a HybridNet."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..api import HybridNet, load
from ..errors import ModelError, OptionError
from ..partition.capability import PROFILES
from ..partition.partitioner import CAFFE
from ..executor.engine_choice import MAX_THREADS
from .option_types import MAX_WORKSPACE_MIB, cache_folder, float_type, input_shape, int_type

if TYPE_CHECKING:
    from ..engines.engine_cache import EngineCache
    from ..engines.tensorrt_build import BuildSettings
    from ..executor.engine_choice import CpuSettings


AUTO = "auto"
DEFAULT_MIN_SEGMENT_SIZE = 3
#: --random-weights seeds: what numpy's generators accept, within 64 bits.
SEED = int_type(0, 2**64 - 1)


def parse_min_segment_size(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'auto', not {text!r}") from None
    return int_type(0)(text)


def add_model_options(parser: argparse.ArgumentParser, *, weights: bool = True, auto_min: bool = False) -> None:
    """``auto_min`` lets --min-segment-size be "auto" (commands that run the model on inputs)."""
    parser.add_argument("model", type=Path, help="deploy.prototxt of the Caffe model")
    if weights:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--weights", type=Path, help="trained .caffemodel")
        group.add_argument("--random-weights", type=SEED, metavar="SEED",
                           help="fill all parameters with random values (models without weights)")
    parser.add_argument("--profile", choices=PROFILES, default="tensorrt",
                        help="which layers TensorRT may take (default: tensorrt)")
    parser.add_argument("--min-segment-size", type=parse_min_segment_size if auto_min else int_type(0),
                        default=DEFAULT_MIN_SEGMENT_SIZE, metavar="N|auto" if auto_min else "N",
                        help="TensorRT segments with fewer compute layers run in Caffe (default 3)"
                             + ("; auto: time every distinct partition on the inputs and take the fastest"
                                if auto_min else ""))
    parser.add_argument("--fallback", nargs="+", default=[], metavar="NAME_OR_TYPE",
                        help="force these layers (by name or type) to Caffe")
    parser.add_argument("--output-blob", action="append", default=[], metavar="BLOB",
                        help="blob to return (run) or show as a segment output (partition) "
                             "instead of the net's outputs: its last write, as Caffe's net.blobs holds "
                             "after forward (a value id such as data@bn names one write); repeatable")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=DxDxDxD", type=input_shape,
                        help="replace an input's size from the prototxt, e.g. data=1x3x720x1280")
    add_lowerings_option(parser)
    parser.add_argument("--require-full", action="store_true",
                        help="fail, listing the unsupported layers, if anything would run in Caffe")


def add_lowerings_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lowerings", action="append", default=[], metavar="MODULE",
                        help="import MODULE (a module name or a .py file) whose register_lowering calls "
                             "lower your own layers; repeatable")


def load_lowerings(args: argparse.Namespace) -> None:
    """Import the --lowerings modules (before the model is partitioned)."""
    from ..lowering.plugins import load_lowering_modules
    load_lowering_modules(args.lowerings, label="--lowerings")


def _net_options(args: argparse.Namespace, engine: str, batch: int, min_segment_size: int) -> dict[str, Any]:
    """HybridNet's keyword arguments from the command line."""
    options: dict[str, Any] = {"engine": engine, "profile": args.profile, "min_segment_size": min_segment_size,
                               "fallback": args.fallback, "outputs": args.output_blob}
    if hasattr(args, "workspace"):
        options.update(build_settings=build_settings(args, batch), engine_cache=engine_cache(args),
                       tensorrt_module=args.tensorrt_module)
    if getattr(args, "device", None) is not None:
        options["device"] = args.device
    if hasattr(args, "cuda_graphs"):
        options["cuda_graphs"] = args.cuda_graphs
    if getattr(args, "check", False):
        options["keep_logits"] = True  # run --check compares them: keep them from the start
    if hasattr(args, "calibration"):  # run, build, export, diff (calibrate's --keep-fp32 goes into its file)
        if args.calibration is not None and getattr(args, "fp16", False):
            raise OptionError("--fp16 with --calibration: the calibration file sets the precision (its Q/DQ or "
                              "FP16 network is strongly typed, and TensorRT ignores precision flags there); for "
                              "FP16 engines calibrate with --precision fp16")
        if args.calibration is not None or args.keep_fp32:
            options.update(calibration=args.calibration, keep_fp32=args.keep_fp32)
    if hasattr(args, "threads"):
        options["cpu_settings"] = cpu_settings(args)
    return options


def open_net(args: argparse.Namespace, *, engine: str = "auto", batch: int = 1) -> HybridNet:
    """The model partitioned as the options say; with ``--min-segment-size auto`` at the default
    minimum until ``auto_min_segment_size`` has measured the alternatives on the inputs."""
    min_size = DEFAULT_MIN_SEGMENT_SIZE if args.min_segment_size == AUTO else args.min_segment_size
    load_lowerings(args)
    net = load(args.model, getattr(args, "weights", None), random_weights=getattr(args, "random_weights", None),
               input_shapes=parse_input_shapes(args.input_shape),
               **_net_options(args, engine, batch, min_size))
    if args.require_full:
        in_caffe = [n for s in net.partition.segments if s.backend == CAFFE for n in s.layers]
        if in_caffe:
            reasons = net.partition.fallback_reasons
            listing = "; ".join(f"{n} ({net.graph.layers[n].type}): {reasons.get(n, 'unsupported')}"
                                for n in in_caffe)
            raise ModelError(f"--require-full: {len(in_caffe)} layer(s) of {args.model} would run in "
                             f"Caffe: {listing}")
    return net


def auto_min_segment_size(net: HybridNet, args: argparse.Namespace, inputs: Mapping[str, np.ndarray], *,
                          engine: str = "auto", batch: int = 1) -> HybridNet:
    """For ``--min-segment-size auto``: the fastest partition of ``net``'s model on ``inputs``
    (engines built), after printing what was chosen and why; ``net`` itself otherwise."""
    if args.min_segment_size != AUTO:
        return net
    from ..analysis.auto_min import choose_min_segment_size
    net.close()
    choice = choose_min_segment_size(lambda size: HybridNet(net.model, **_net_options(args, engine, batch, size)),
                                     inputs, net.reference_values(inputs), tolerance=getattr(args, "tolerance", 1e-4))
    print(choice.reason)
    return choice.net


def add_build_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TensorRT builder")
    g.add_argument("--workspace", type=float_type(maximum=MAX_WORKSPACE_MIB, positive=True), default=1024,
                   metavar="MIB",
                   help="workspace memory pool limit in MiB (the old MaxWorkspaceSize; default 1024)")
    g.add_argument("--max-batch", type=int_type(1), default=None, metavar="N",
                   help="largest batch the engines accept (optimization profile max; the old MaxBatchSize)")
    g.add_argument("--opt-batch", type=int_type(1), default=None, metavar="N", help="batch the engines are tuned for")
    g.add_argument("--fp16", action="store_true", help="FP16 engines (FP32 inputs and outputs)")
    g.add_argument("--tf32", action="store_true", help="allow TF32 matrix math (off: FP32 matches Caffe)")
    g.add_argument("--opt-level", type=int, choices=range(6), metavar="0-5", help="builder optimization level")
    g.add_argument("--timing-iterations", type=int_type(1), metavar="N", help="timing iterations where supported")
    g.add_argument("--compute-capability", nargs="+", default=[], metavar="X.Y",
                   help="TensorRT-RTX target GPUs, e.g. 8.6 12.0 (default: RTX's own set)")
    g.add_argument("--mark-all-outputs", action="store_true",
                   help="make every intermediate tensor an engine output (debugging; blocks fusions)")
    g.add_argument("--engine-cache", type=cache_folder, metavar="DIR", help="engine cache folder")
    g.add_argument("--tensorrt-module", choices=("tensorrt", "tensorrt_rtx"),
                   help="TensorRT Python module to use (default: whichever imports)")


def add_cpu_options(parser: argparse.ArgumentParser) -> None:
    """Options of the CPU engines (ONNX Runtime, OpenVINO) that run TensorRT segments without a GPU."""
    g = parser.add_argument_group("CPU engines")
    g.add_argument("--threads", type=int_type(0, MAX_THREADS), default=0, metavar="N",
                   help="threads per CPU engine (default 0: every CPU this process may use)")
    g.add_argument("--bf16", action="store_true",
                   help="OpenVINO computes in BF16 (CPUs with avx512_bf16 or AMX): faster, reduced precision; "
                        "the error against Caffe is measured and shown")


def cpu_settings(args: argparse.Namespace) -> "CpuSettings":
    from ..executor.engine_choice import CpuSettings
    # compare takes several engines (a list, or None for its default, auto)
    engines = args.engine if isinstance(args.engine, list) and args.engine else [args.engine or "auto"]
    if args.bf16 and not {"auto", "openvino"} & set(engines):
        raise OptionError("--bf16 applies to OpenVINO: use it with --engine openvino or auto")
    return CpuSettings(threads=args.threads, bf16=args.bf16)


def build_settings(args: argparse.Namespace, batch: int = 1) -> "BuildSettings":
    from ..engines.tensorrt_build import BuildSettings
    if args.opt_batch and args.max_batch and args.opt_batch > args.max_batch:
        raise OptionError(f"--opt-batch {args.opt_batch} is above --max-batch {args.max_batch}: the batch the "
                          "engines are tuned for must be one they accept")
    batch_max = max(args.max_batch or batch, batch)
    return BuildSettings(workspace_bytes=int(args.workspace * 2**20), batch_min=1,
                         batch_opt=min(args.opt_batch or batch, batch_max), batch_max=batch_max,
                         fp16=args.fp16, tf32=args.tf32, optimization_level=args.opt_level,
                         timing_iterations=args.timing_iterations,
                         compute_capabilities=tuple(args.compute_capability),
                         mark_all_outputs=args.mark_all_outputs)


def engine_cache(args: argparse.Namespace) -> "EngineCache":
    from ..engines.engine_cache import EngineCache
    return EngineCache(args.engine_cache)


def parse_input_shapes(specs: list[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """``--input-shape`` values (already checked by ``option_types.input_shape``) by input name;
    an input given twice is an error (which of the two was meant?)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in specs:
        if name in shapes and shapes[name] != dims:
            raise OptionError(f"--input-shape gives '{name}' twice ({'x'.join(map(str, shapes[name]))} and "
                              f"{'x'.join(map(str, dims))}); give each input one shape")
        shapes[name] = dims
    return shapes

