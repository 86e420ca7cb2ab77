"""Checks of argument values, shared by the command line (at parse time) and the Python API.

Each check takes the value and the name the user knows it by (``--batch`` on the command
line, ``min_segment_size`` in Python) and returns the value, or raises ``OptionError``
naming it: a wrong type or an out-of-range number never reaches numpy, protobuf or Caffe,
where it would surface as a bare ``TypeError``, an ``OverflowError`` or an abort.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from .errors import OptionError

#: Caffe counts elements and sizes dimensions in 32-bit ints (blob.hpp: ``int count_``).
INT32_MAX = 2**31 - 1


def _error(name: str, text: str) -> OptionError:
    """``name text``; the command line passes no name (argparse already names the option)."""
    return OptionError(f"{name} {text}" if name else text)


def integer(value: Any, name: str, minimum: int = 0, maximum: int = INT32_MAX) -> int:
    """An ``int`` (numpy integers too, never ``bool``) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _error(name, f"must be a whole number, not {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise _error(name, f"must be {minimum} or more, not {value}")
    if value > maximum:
        raise _error(name, f"must be at most {maximum}, not {value}")
    return value


def real(value: Any, name: str, minimum: float = -math.inf, maximum: float = math.inf,
         positive: bool = False) -> float:
    """A finite real number in ``[minimum, maximum]`` (above 0 if ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _error(name, f"must be a number, not {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _error(name, f"must be a finite number, not {value}")
    if positive and value <= 0:
        raise _error(name, f"must be above 0, not {value:g}")
    if value < minimum:
        raise _error(name, f"must be at least {minimum:g}, not {value:g}")
    if value > maximum:
        raise _error(name, f"must be at most {maximum:g}, not {value:g}")
    return value


def path(value: Any, name: str) -> Path:
    """A file path given as ``str`` or ``os.PathLike``."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise _error(name, f"must be a file path (str or pathlib.Path), not {type(value).__name__} {value!r}")
    return Path(value)


def optional(check: Any, value: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """``None``, or ``check(value, name, ...)``."""
    return None if value is None else check(value, name, *args, **kwargs)


def choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _error(name, f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
    return value


def names(value: Any, name: str) -> list[str]:
    """A list of strings from any iterable of them; a lone string is refused (it would be
    read letter by letter)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _error(name, f"must be a list of names, not {type(value).__name__} {value!r}")
    items = list(value)
    wrong = [item for item in items if not isinstance(item, str)]
    if wrong:
        raise _error(name, f"must hold names (str), not {type(wrong[0]).__name__} {wrong[0]!r}")
    return items


def shape(value: Any, name: str) -> tuple[int, ...]:
    """A tensor shape: one or more dimensions, each 1 to ``INT32_MAX``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _error(name, f"must be a sequence of dimensions, not {type(value).__name__} {value!r}")
    dims = tuple(integer(d, f"{name} dimension", 1) for d in value)
    if not dims:
        raise _error(name, "needs at least one dimension")
    return dims


def shapes(value: Optional[Mapping[str, Any]], name: str) -> dict[str, tuple[int, ...]]:
    """Input shapes by blob name."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _error(name, f"must map input names to shapes, not {type(value).__name__} {value!r}")
    return {names([blob], name)[0]: shape(dims, f"{name}[{blob!r}]") for blob, dims in value.items()}
