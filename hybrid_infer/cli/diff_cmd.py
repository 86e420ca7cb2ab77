"""``hybrid-infer diff``: every intermediate value of the hybrid against pure Caffe."""
from __future__ import annotations

import argparse
import json
import sys

from ..analysis.bisect import bisect
from ..analysis.layer_diff import Settings, caffe_values, layer_diff, to_json, to_text
from ..executor.engine_factory import ENGINES
from ..report.bar_chart import check_writable
from ..files import check_not_read, write_atomically
from ..errors import OptionError
from .common import add_model_options, open_net
from .input_options import add_input_options, files_read, gather_inputs, preprocessing
from .option_types import float_type, output_file
from .precision_options import add_precision_options, check_tolerance


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diff", help="compare every intermediate value of the hybrid with pure Caffe",
        description="Run the hybrid and pure Caffe on the same inputs and report, in execution order, "
                    "each value's error; the first above --tolerance is flagged with its layer, backend "
                    "and segment. --bisect then searches for the smallest set of lowered layers that "
                    "causes a mismatch.")
    add_model_options(p)
    add_input_options(p)
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="engine for supported segments (auto: TensorRT if it can run here, else ONNX Runtime's "
                        "CUDA provider, else the faster CPU engine per segment)")
    p.add_argument("--tolerance", type=float_type(0), default=None,
                   help="relative L2 error per value above which it is flagged (1e-4; with --calibration twice "
                        "the error calibrate measured, at least 1e-4; 0 flags any difference)")
    p.add_argument("--bisect", action="store_true",
                   help="on a mismatch, find the smallest set of TensorRT layers that still causes one "
                        "(runs the hybrid repeatedly with layers forced to Caffe)")
    p.add_argument("--json", type=output_file, metavar="FILE", help="write the per-value errors as JSON")
    add_precision_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.bisect and args.calibration:
        raise OptionError("--bisect moves layers to Caffe, which re-cuts the segments the calibration was made for; "
                          "bisect without --calibration (or keep layers in FP32 with --keep-fp32 instead)")
    if args.json:
        check_writable(args.json, "--json")
        check_not_read(args.json, "--json", files_read(args))
    net = open_net(args, engine=args.engine, batch=args.batch or 1)
    inputs, _ = gather_inputs(net, args.input, preprocessing(args), args.batch)
    args.tolerance, why_tolerance = check_tolerance(net, args.tolerance)
    if why_tolerance:
        print(why_tolerance, file=sys.stderr)
    settings = Settings(args.profile, args.min_segment_size, tuple(args.fallback), args.engine)
    diff = layer_diff(net, settings, inputs, args.tolerance)
    sys.stdout.write(to_text(diff))
    report = to_json(diff)
    status = 0 if diff.first_above is None else 1
    if args.bisect and diff.first_above is not None and diff.caffe_unstable:
        print("\nbisect: not run: Caffe, the reference, is not deterministic at the first mismatch (see the warning "
              "above), so no set of lowered layers can be blamed for it")
        report["bisect"] = {"culprits": [], "runs": 0, "explanation": "not run: " + diff.caffe_unstable}
    elif args.bisect and diff.first_above is not None:
        print("\nbisecting over the layers on TensorRT (each step is one hybrid run) ...", file=sys.stderr)
        found = bisect(net, settings, inputs, caffe_values(net, inputs), args.tolerance)
        print(f"\nbisect: {found.explanation}")
        report["bisect"] = {"culprits": found.culprits, "runs": found.runs, "explanation": found.explanation}
    if args.json:
        write_atomically(args.json, (json.dumps(report, indent=2) + "\n").encode(), option="--json")
        print(f"wrote {args.json}", file=sys.stderr)
    return status
