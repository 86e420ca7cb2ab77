"""``hybrid-infer compare``: several partitions of one model, timed and checked against Caffe."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from ..analysis.compare import compare_partitions, plot, to_json, to_text
from ..analysis.partition_spec import (PartitionSpec, default_specs, parse_spec, unique_with_caffe_first,
                                      with_engines)
from ..api import HybridNet
from ..executor.engine_choice import available_candidates
from ..executor.engine_factory import ENGINES
from ..model.caffe_model import CaffeModel
from ..partition.capability import PROFILES
from ..report.bar_chart import CHART_SUFFIXES, check_writable
from ..report.progress import Progress
from ..files import check_not_read, write_atomically
from .common import (AUTO, SEED, add_cpu_options, add_lowerings_option, cpu_settings, load_lowerings,
                     parse_input_shapes, parse_min_segment_size)
from .input_options import add_input_options, files_read, gather_inputs, preprocessing
from .option_types import float_type, input_shape, int_type, output_file
from .precision_options import add_precision_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="time and check several partitions of a model against pure Caffe",
        description="Run the same inputs through pure Caffe and several hybrid partitions; report "
                    "segments, boundary traffic, TensorRT coverage, latency, throughput and error "
                    "against Caffe. Default partitions: caffe; profile=tensorrt,min=3; "
                    "profile=tensorrt-2,min=3; profile=tensorrt,min=1; profile=tensorrt,min=10; "
                    "plus one per --fallback list, and profile=tensorrt,min=3 with each installed CPU "
                    "engine (ONNX Runtime, OpenVINO) side by side.")
    p.add_argument("model", type=Path, help="deploy.prototxt of the Caffe model")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--weights", type=Path, help="trained .caffemodel")
    group.add_argument("--random-weights", type=SEED, metavar="SEED",
                       help="fill all parameters with random values (models without weights)")
    p.add_argument("--partition", action="append", default=[], metavar="SPEC",
                   help="a partition to measure instead of the default set: 'caffe' or key=value pairs "
                        "joined by commas, keys profile (tensorrt|tensorrt-2), min (N), fallback "
                        "(NAME+TYPE+...), engine (one of --engine's), e.g. "
                        "profile=tensorrt-2,min=1,fallback=LRN+Concat,engine=openvino; repeatable")
    p.add_argument("--fallback", action="append", nargs="+", default=[], metavar="NAME_OR_TYPE",
                   help="also measure profile=tensorrt,min=3 with these layers (names or types) in Caffe; "
                        "repeat the option for several lists")
    p.add_argument("--min-segment-size", type=parse_min_segment_size, metavar="N|auto",
                   help="also measure this minimum segment size; auto: time every distinct partition "
                        "(--profile, first --fallback list) and add the fastest, saying why")
    p.add_argument("--profile", choices=PROFILES, default="tensorrt",
                   help="profile for --min-segment-size (default: tensorrt)")
    p.add_argument("--output-blob", action="append", default=[], metavar="BLOB",
                   help="compare these blobs instead of the net's outputs; repeatable")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DxDxDxD", type=input_shape,
                   help="replace an input's size from the prototxt, e.g. data=1x3x720x1280")
    add_input_options(p)
    add_lowerings_option(p)
    p.add_argument("--engine", choices=ENGINES, nargs="+", metavar="ENGINE",
                   help=f"engine(s) for supported segments, one of {', '.join(ENGINES)} (default auto: TensorRT "
                        "if it can run here, else the fastest CPU engine per segment); several: every partition "
                        "with each, side by side")
    p.add_argument("--runs", type=int_type(1), default=20, help="timed runs per partition after warm-up (20)")
    p.add_argument("--warmup", type=int_type(0), default=3, help="untimed runs first (3)")
    p.add_argument("--tolerance", type=float_type(0), default=1e-4,
                   help="relative L2 error against Caffe above which a partition is flagged (1e-4)")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", type=output_file, metavar="FILE.png", help="draw median latencies as a bar chart")
    add_precision_options(p, several=True)
    add_cpu_options(p)
    p.set_defaults(func=run)


def _specs(args: argparse.Namespace) -> list[PartitionSpec]:
    specs = [parse_spec(text) for text in args.partition] or default_specs()
    specs += [PartitionSpec(fallback=tuple(names)) for names in args.fallback]
    if isinstance(args.min_segment_size, int):
        specs.append(PartitionSpec(profile=args.profile, min_segment_size=args.min_segment_size))
    if args.engine and len(args.engine) > 1:
        specs = with_engines(specs, args.engine)
    elif not args.engine and not args.partition and len(available_candidates()) > 1:
        # side by side, each engine that can take the options (--bf16: OpenVINO only)
        specs += [PartitionSpec(engine=name) for name in available_candidates() if not args.bf16 or name == "openvino"]
    return unique_with_caffe_first(specs)


def _engine(args: argparse.Namespace) -> str:
    """The engine of specs that name none (with several --engine values, every spec names one)."""
    return args.engine[0] if args.engine and len(args.engine) == 1 else "auto"


def _auto_spec(probe: HybridNet, args: argparse.Namespace, inputs: dict) -> PartitionSpec:
    from ..analysis.auto_min import choose_min_segment_size
    fallback = tuple(args.fallback[0]) if args.fallback else ()
    make_net = lambda size: HybridNet(probe.model, engine=_engine(args), profile=args.profile,
                                      min_segment_size=size, fallback=fallback, outputs=args.output_blob,
                                      cpu_settings=cpu_settings(args))
    choice = choose_min_segment_size(make_net, inputs, probe.reference_values(inputs), tolerance=args.tolerance)
    choice.net.close()
    print(choice.reason)
    return PartitionSpec(profile=args.profile, min_segment_size=choice.min_segment_size, fallback=fallback)


def run(args: argparse.Namespace) -> int:
    if args.plot:
        check_writable(args.plot, "--plot", CHART_SUFFIXES)
        check_not_read(args.plot, "--plot", files_read(args))
    if args.json:
        check_writable(args.json, "--json")
        check_not_read(args.json, "--json", files_read(args))
    settings = cpu_settings(args)
    specs = _specs(args)
    load_lowerings(args)
    model = CaffeModel(args.model, args.weights, parse_input_shapes(args.input_shape))
    if args.random_weights is not None:
        model.set_random_weights(args.random_weights)
    probe = HybridNet(model, outputs=args.output_blob)
    inputs, _ = gather_inputs(probe, args.input, preprocessing(args), args.batch)
    variants = []
    if args.calibration:  # every file checked (stale, unreadable) before anything is measured
        from ..precision.variants import measure_precisions, open_precisions
        variants = open_precisions(model, args.calibration, engine=_engine(args), outputs=args.output_blob,
                                   keep_fp32=args.keep_fp32)
    if args.min_segment_size == AUTO:
        specs = unique_with_caffe_first([*specs, _auto_spec(probe, args, inputs)])
    print(f"measuring {len(specs)} partition(s)" + (f" and {len(variants)} calibrated variant(s)" if variants else "")
          + f", {args.warmup} warm-up + {args.runs} timed run(s) each", file=sys.stderr)
    progress = Progress((len(specs) + len(variants)) * (args.runs + args.warmup), "compare")
    try:
        results = compare_partitions(model, specs, inputs, engine=_engine(args), outputs=args.output_blob,
                                     tolerance=args.tolerance, runs=args.runs, warmup=args.warmup,
                                     tick=progress.tick, cpu_settings=settings)
        if variants:
            results += measure_precisions(variants, inputs, probe.reference_values(inputs), runs=args.runs,
                                          warmup=args.warmup, tick=progress.tick)
    finally:
        progress.close()
    sys.stdout.write(to_text(results))
    title = f"{args.model.name} ({args.model.parent.name}), batch {results[0].batch}"
    if args.json:
        meta = {"model": str(args.model), "weights": str(args.weights) if args.weights else None,
                "random_weights": args.random_weights, "runs": args.runs, "warmup": args.warmup,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)"}
        write_atomically(args.json, (json.dumps(to_json(results, meta), indent=2) + "\n").encode(),
                         option="--json")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot, title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(r.within for r in results) else 1
