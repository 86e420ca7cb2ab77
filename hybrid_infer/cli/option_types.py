"""argparse ``type=`` functions: every option's value is checked when the command line is
parsed, and a bad one is reported as ``hybrid-infer run: error: argument --batch: must be
1 or more, not 0`` before any model is loaded. The range checks are ``arguments.py``'s,
the same the Python API applies.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

from .. import arguments
from ..arguments import INT32_MAX
from ..errors import OptionError
from ..files import expand_folder

#: Largest image ``--resize`` accepts, in pixels: Pillow's own decompression-bomb limit
#: (``PIL.Image.MAX_IMAGE_PIXELS``), which the image reader applies to the files too.
MAX_IMAGE_PIXELS = 89_478_485
#: Largest TensorRT workspace ``--workspace`` accepts: 1 TiB, in MiB.
MAX_WORKSPACE_MIB = 2**20


def _checked(check: Callable[[], object]) -> object:
    try:
        return check()
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def int_type(minimum: int = 0, maximum: int = INT32_MAX) -> Callable[[str], int]:
    """A whole number in ``[minimum, maximum]``."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        return _checked(lambda: arguments.integer(value, "", minimum, maximum))  # type: ignore[return-value]
    parse.__name__ = "whole number"  # argparse's fallback message names the type
    return parse


def float_type(minimum: float = -math.inf, maximum: float = math.inf,
               positive: bool = False) -> Callable[[str], float]:
    """A finite number in ``[minimum, maximum]`` (above 0 if ``positive``): no nan, no inf."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
        return _checked(lambda: arguments.real(value, "", minimum, maximum, positive))  # type: ignore[return-value]
    parse.__name__ = "number"
    return parse


def _dims(text: str, count: int | None, example: str) -> tuple[int, ...]:
    """``DxDx...`` (``count`` dimensions if given), each 1 to INT32_MAX."""
    try:
        dims = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or (count is not None and len(dims) != count):
        raise argparse.ArgumentTypeError(f"expected {example}, not {text!r}")
    for d in dims:
        _checked(lambda d=d: arguments.integer(d, "each dimension", 1))
    return dims


def resize(text: str) -> tuple[int, int]:
    """``HxW`` for ``--resize``: two sizes of at least 1, at most Pillow's pixel limit in all."""
    height, width = _dims(text, 2, "HxW, e.g. 224x224")
    if height * width > MAX_IMAGE_PIXELS:
        raise argparse.ArgumentTypeError(f"{height}x{width} is {height * width} pixels; at most "
                                         f"{MAX_IMAGE_PIXELS} (Pillow's decompression-bomb limit)")
    return height, width


def input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=DxDx...`` for ``--input-shape``, split at the last '=' (a blob name may hold one)."""
    name, sep, dims = text.rpartition("=")
    example = "NAME=DxDx..., e.g. data=1x3x720x1280"
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected {example}, not {text!r}")
    return name, _dims(dims, None, example)


def _absolute(text: str, what: str) -> Path:
    """``text`` made absolute against the current folder now, at parse time: a Python layer
    that changes the current folder later cannot move where the command writes."""
    if not text:
        raise argparse.ArgumentTypeError(f"expected {what}, not an empty string")
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        if os.path.isabs(text):
            return Path(text)
        raise argparse.ArgumentTypeError(f"{text!r} is relative to the current folder, which no longer exists; "
                                         "cd to an existing folder or give an absolute path") from None
    return Path(cwd, text)


def output_file(text: str) -> Path:
    """A file to write (``-o``, ``--json``, ``--plot``), as an absolute path; a name ending
    in ``/`` names a folder and is refused."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} ends in '/', so it names a folder; give a file name")
    return _absolute(text, "a file name")


def output_folder(text: str) -> Path:
    """A folder to write into (``export -o``), as an absolute path."""
    return _absolute(text, "a folder name")


def cache_folder(text: str) -> Path:
    """``--engine-cache DIR``: ``~`` and ``~user`` expanded, made absolute."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder name, not an empty string")
    try:
        return _absolute(str(expand_folder(text, "")), "a folder name")
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
