"""``hybrid-infer partition``: show how a model would be split."""
from __future__ import annotations

import argparse
import sys

from ..report.partition_report import FORMATS
from ..files import check_not_read, check_output_path, write_atomically
from .common import add_model_options, open_net
from .input_options import files_read
from .option_types import output_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("partition", help="show the TensorRT/Caffe partition of a model",
                       description="Split a Caffe model into TensorRT and Caffe segments and show it.")
    add_model_options(p)
    p.add_argument("--format", choices=sorted(FORMATS), default="text")
    p.add_argument("-o", "--output", type=output_file, help="write to FILE instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.output:
        check_output_path(args.output, "-o")
        check_not_read(args.output, "-o", files_read(args))
    net = open_net(args)
    rendered = FORMATS[args.format](net.partition)
    if args.output:
        write_atomically(args.output, rendered.encode(), option="-o")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(rendered)
    return 0
