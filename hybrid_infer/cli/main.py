"""Entry point of ``hybrid-infer``: parse, dispatch, and turn user errors into one line.

What the process prints on its way out is part of the promise too: an error is one line
on standard error (control characters and line breaks written as escapes, so that a
file name holding them cannot break it up); a reader that stops early (``run ... | head
-1``) ends the command quietly, as it ends any Unix tool (exit status 141, as for
SIGPIPE); standard output that cannot be written (closed, or a full disk) is an error
that says so; SIGTERM is handled as Ctrl-C is (the temporary files are removed), with
exit status 143 (130 for Ctrl-C).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from typing import Any, NoReturn, Optional, Sequence

from ..errors import HybridInferError
from . import build_cmd, calibrate_cmd, compare_cmd, diff_cmd, export_cmd, partition_cmd, run_cmd

#: Exit statuses of a command stopped by a signal, as a shell reports them (128 + signal).
EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_BROKEN_PIPE = 130, 143, 141


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that the same clean-up runs."""


class StdoutFailed(BaseException):
    """Writing standard output failed (``error`` says why). A BaseException, like
    KeyboardInterrupt, so that no handler of ordinary errors on the way mistakes it for its own."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.error = error


class _GuardedStdout:
    """Standard output whose write errors raise ``StdoutFailed``, telling them apart from
    the OSErrors of anything else the command does."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of hybrid-infer
    (argparse prints the whole usage first, which buries the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="hybrid-infer",
        description="Run Caffe models with TensorRT where it can and Caffe where it cannot.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Caffe's log")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (partition_cmd, run_cmd, build_cmd, export_cmd, compare_cmd, diff_cmd, calibrate_cmd):
        module.register(sub)
    return parser


def one_line(message: str) -> str:
    """``message`` as one printable line: line breaks, tabs and other control characters
    (a NUL from a damaged file, a newline in a file name) written as Python escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def _error(message: str) -> None:
    if sys.stderr is not None:
        print(f"hybrid-infer: error: {one_line(message)}", file=sys.stderr)


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that the interpreter's own flush at exit
    does not fail again and print "Exception ignored"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    if sys.stdout is None:  # started with standard output closed (">&-")
        _error("standard output is closed; give the command somewhere to write, e.g. >/dev/null")
        return 2
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["GLOG_minloglevel"] = "0"  # read by Caffe when it is first imported
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="hybrid-infer: %(levelname)s: %(message)s")
    stdout, sys.stdout = sys.stdout, _GuardedStdout(sys.stdout)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        status = args.func(args)
        sys.stdout.flush()
        return status
    except HybridInferError as exc:
        if args.debug:
            raise
        _error(str(exc))
        return 2
    except MemoryError:
        if args.debug:
            raise
        _error("out of memory; use a smaller --batch or --input-shape, or a machine with more memory")
        return 2
    except StdoutFailed as exc:
        _silence_stdout()
        if exc.error.errno == errno.EPIPE:
            return EXIT_BROKEN_PIPE  # the reader has stopped reading: nothing more to say
        _error(f"cannot write to standard output ({exc})")
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        if sys.stderr is not None:
            print(f"hybrid-infer: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_term)
        sys.stdout = stdout
        try:
            stdout.flush()  # what an error left unwritten
        except OSError:
            _silence_stdout()


if __name__ == "__main__":
    sys.exit(main())
