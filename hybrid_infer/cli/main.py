"""Entry point of ``hybrid-infer``: parse, dispatch, and turn user errors into one line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Optional, Sequence

from ..errors import HybridInferError
from . import build_cmd, calibrate_cmd, compare_cmd, diff_cmd, export_cmd, partition_cmd, run_cmd


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of hybrid-infer
    (argparse prints the whole usage first, which buries the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hybrid-infer",
        description="Run Caffe models with TensorRT where it can and Caffe where it cannot.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Caffe's log")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (partition_cmd, run_cmd, build_cmd, export_cmd, compare_cmd, diff_cmd, calibrate_cmd):
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["GLOG_minloglevel"] = "0"  # read by Caffe when it is first imported
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="hybrid-infer: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except HybridInferError as exc:
        if args.debug:
            raise
        print(f"hybrid-infer: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        if args.debug:
            raise
        print("hybrid-infer: error: out of memory; use a smaller --batch or --input-shape, or a machine with "
              "more memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybrid-infer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
