"""Where inputs come from, for every command that runs a model: ``.npy`` files or images
(with explicit preprocessing), repeated to a batch, or random values when none are given."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..api import HybridNet
from ..errors import InputError, OptionError
from ..index_inputs import index_bound
from ..inputs import Preprocessing, load_input, random_indices, random_input
from .option_types import float_type, int_type, resize


def add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="extend", nargs="+", default=[], metavar="[NAME=]FILE",
                   help="input blob from .npy arrays or images; several files of one input form a "
                        "batch; FILE alone feeds the only input")
    p.add_argument("--batch", type=int_type(1), help="repeat the inputs to this batch size")
    prep = p.add_argument_group("image preprocessing: value = (pixel - mean[c]) * scale, pixels 0..255")
    prep.add_argument("--scale", type=float_type(), default=1.0)
    prep.add_argument("--mean", type=float_type(), nargs="+", default=[], help="one value, or one per channel")
    prep.add_argument("--channel-order", choices=("bgr", "rgb"), default="bgr",
                      help="channel order the model expects (Caffe models: usually bgr)")
    prep.add_argument("--resize", metavar="HxW", type=resize, help="resize images to HxW (default: the input's size)")


def files_read(args: argparse.Namespace) -> dict[Path, str]:
    """Every file the command reads (path -> what it is), which no output may overwrite.
    For ``--input`` each way of reading NAME=FILE counts (a file name may hold '=')."""
    read = {args.model: "the prototxt"}
    if getattr(args, "weights", None):
        read[args.weights] = "the weights file"
    for spec in getattr(args, "input", []):
        for candidate in [spec, *(spec[i + 1:] for i, c in enumerate(spec) if c == "=")]:
            read.setdefault(Path(candidate), "an input file")
    if getattr(args, "labels", None):
        read[args.labels] = "the labels file"
    for module in getattr(args, "lowerings", []):
        read.setdefault(Path(module), "a lowerings module")
    return read


def split_input_spec(spec: str, inputs: Sequence[str]) -> tuple[str | None, str]:
    """``--input`` as (input name, file): ``NAME=FILE`` when the text before one of its '='
    names an input of the model (the longest such, so a blob name may hold '=' too), else
    ``(None, spec)``: the whole text is a file name, for a model's only input."""
    names = [spec[:i] for i, c in enumerate(spec) if c == "=" and spec[:i] in inputs]
    if names:
        name = max(names, key=len)
        return name, spec[len(name) + 1:]
    return None, spec


def preprocessing(args: argparse.Namespace) -> Preprocessing:
    return Preprocessing(args.scale, tuple(args.mean), args.channel_order, args.resize)


def gather_inputs(net: HybridNet, specs: list[str], prep: Preprocessing,
                  batch: int | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Inputs by blob name, plus the file names per batch item (for printing)."""
    shapes = net.input_shapes()
    if prep.mean:
        for name, shape in shapes.items():
            if len(shape) == 4 and len(prep.mean) not in (1, shape[1]):
                raise OptionError(f"--mean has {len(prep.mean)} values; input '{name}' has {shape[1]} channels: give "
                                  "one value, or one per channel")
    files: dict[str, list[Path]] = {}
    for spec in specs:
        name, file = split_input_spec(spec, list(shapes))
        if name is None:
            given = spec.partition("=")[0]
            if "=" in spec and not os.path.lexists(spec):
                raise InputError(f"--input {spec}: '{given}' is not an input of {net.model.prototxt} (its inputs "
                                 f"are {', '.join(shapes)}), and no file of that name exists")
            if len(shapes) != 1:
                raise OptionError(f"--input {spec}: this model has inputs {', '.join(shapes)}; write NAME=FILE")
            name = next(iter(shapes))
        if not file:
            raise OptionError(f"--input {spec}: no file name given")
        files.setdefault(name, []).append(Path(file))
    # Nothing is allocated for inputs or activations that cannot fit (memory_budget.py).
    net.check_memory(batch or 1, sum(4 * (batch or shape[0]) * math.prod(shape[1:]) for shape in shapes.values()))
    inputs: dict[str, np.ndarray] = {}
    labels: list[str] = []
    for name, shape in shapes.items():
        if name in files:
            inputs[name] = _stack([(f, load_input(f, shape, prep)) for f in files[name]], name)
            labels = labels or [f.name for f in files[name]]
        else:
            shape = (batch, *shape[1:]) if batch else shape
            readers = net.index_readers(name)
            if readers:
                bound = index_bound(readers, net.graph, batch or next(iter(shapes.values()))[0])
                inputs[name] = random_indices(shape, bound)
                print(f"note: no --input for '{name}': using random whole numbers in [0, {bound}) of shape "
                      f"{shape} (indices for {', '.join(repr(layer.name) for layer in readers)})")
            else:
                inputs[name] = random_input(shape)
                print(f"note: no --input for '{name}': using random normal values of shape {shape}")
    if batch:
        for name, array in inputs.items():
            reps = -(-batch // array.shape[0])
            inputs[name] = np.concatenate([array] * reps)[:batch]
        labels = (labels * batch)[:batch] if labels else []
    return inputs, labels


def _stack(arrays: list[tuple[Path, np.ndarray]], name: str) -> np.ndarray:
    """One batch from the files of input ``name``, which must agree on everything but the batch."""
    first_path, first = arrays[0]
    for path, array in arrays[1:]:
        if array.shape[1:] != first.shape[1:]:
            raise InputError(f"--input {name}: {path} holds items of shape {array.shape[1:]}, {first_path} of shape "
                             f"{first.shape[1:]}; the files of one input must agree (they form one batch)")
    return np.concatenate([array for _, array in arrays])
