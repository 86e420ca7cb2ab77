"""Hostile cases for the fuzz harness: mutated models, inputs, command lines and file states.

Each mutator is a function ``(ctx) -> Case`` registered in ``MUTATORS``; it writes whatever
files its case needs into ``ctx.folder`` (the case's working folder) and returns the case.
To add a kind of hostile input, write a function and add it to ``MUTATORS``: the harness,
``tests/test_fuzz.py`` and ``scripts/fuzz.py`` pick it up.

Seed models are the bundled ones (graphs/) and the third-party ones (../shared/models),
read in place. Everything is drawn from ``ctx.rng`` (a seeded ``random.Random``), so a case
number and seed reproduce a case exactly.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fuzz_harness import REPO, Case

GRAPHS = REPO / "graphs"
SHARED = REPO.parent / "shared" / "models"
PYTHON_LAYERS = str(GRAPHS / "python_layers")
IS_ROOT = os.geteuid() == 0


@dataclass(frozen=True)
class Seed:
    """A model to start from. ``runnable``: small enough to run (and check) in a second."""
    name: str
    prototxt: Path
    weights: Optional[Path] = None
    samples: tuple[Path, ...] = ()
    input_args: tuple[str, ...] = ()
    runnable: bool = True
    python_layers: bool = False


def _seeds() -> list[Seed]:
    lenet = GRAPHS / "lenet_digits"
    seeds = [
        Seed("lenet_digits", lenet / "deploy.prototxt", lenet / "lenet_digits.caffemodel",
             tuple(sorted((lenet / "samples").glob("*")))[:4], ("--scale", "0.00392156862745098")),
        Seed("python_layer_net", GRAPHS / "python_layer_net/deploy.prototxt", python_layers=True),
        *(Seed(p.stem, p, python_layers=True) for p in sorted((GRAPHS / "python_layer_positions").glob("*.prototxt"))),
    ]
    if not SHARED.is_dir():
        return seeds
    s = SHARED
    seeds += [
        Seed("lenet_mnist", s / "lenet_mnist/mnist_deploy.prototxt", s / "lenet_mnist/lenet_iter_10000.caffemodel",
             tuple(sorted((s / "lenet_mnist/samples").glob("*.png")))[:3], ("--scale", "0.00390625")),
        Seed("cifar10_full", s / "cifar10_full/cifar10_full.prototxt",
             s / "cifar10_full/cifar10_full_iter_70000.caffemodel"),
        *(Seed(f"mtcnn_{d}", s / f"mtcnn/{d}.prototxt", s / f"mtcnn/{d}.caffemodel",
               (s / "mtcnn/test1.jpg",) if d != "det4" else ()) for d in ("det1", "det2", "det3", "det4")),
        Seed("fsrcnn", s / "fsrcnn/FSRCNN_mat.prototxt", s / "fsrcnn/snapshot_iter_2546000.caffemodel"),
        Seed("hyperlpr_ssd", s / "hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt",
             s / "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel", runnable=False),
        *(Seed(p.stem, p) for p in sorted((s / "opencv_dnn_layers").glob("*.prototxt"))),
        *(Seed(name, s / path, runnable=False) for name, path in (
            ("googlenet", "bvlc_googlenet/deploy.prototxt"), ("resnet50", "resnet_50/ResNet-50-deploy.prototxt"),
            ("alexnet", "bvlc_alexnet/deploy.prototxt"), ("caffenet", "bvlc_caffenet/deploy.prototxt"),
            ("squeezenet", "squeezenet_v1.1/deploy.prototxt"),
            ("mobilenet_v1", "mobilenet_v1/mobilenet_deploy.prototxt"),
            ("mobilenet_ssd", "mobilenet_ssd/MobileNetSSD_deploy.prototxt"))),
    ]
    return seeds


SEEDS = _seeds()
SMALL = [seed for seed in SEEDS if seed.runnable]
TRAINED = [seed for seed in SEEDS if seed.weights is not None and seed.runnable]


@dataclass
class Ctx:
    """What a mutator works with: its random source and its case folder."""
    rng: random.Random
    folder: Path
    golden_cache: Optional[Path] = None
    env: dict[str, str] = field(default_factory=dict)

    def write(self, name: str, data: bytes | str) -> str:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return name


# --- values ------------------------------------------------------------------------------------

HOSTILE_INTS = ["0", "-1", "1", "2", "3", "7", "64", "1000", "65535", "2147483647", "2147483648",
                "-2147483648", "99999999999999999999", "1e9", "0.5", "nan", "", "0x10", "1_000", " 3", "\u0663"]
HOSTILE_FLOATS = ["0", "-0", "-1", "1e-45", "1e38", "3.5e38", "1e309", "nan", "-nan", "inf", "-inf", "1e-300",
                  "0.1", "100", "abc"]
ENUMS = ["MAX", "AVE", "STOCHASTIC", "SUM", "PROD", "ACROSS_CHANNELS", "WITHIN_CHANNEL", "CAFFE", "DEFAULT",
         "MEAN", "ASUM", "SUMSQ", "CENTER", "BOGUS"]
LAYER_TYPES = ["Convolution", "Pooling", "InnerProduct", "ReLU", "Sigmoid", "TanH", "Softmax", "Dropout",
               "Split", "Concat", "Slice", "Eltwise", "Flatten", "Reshape", "Power", "Exp", "Log", "AbsVal",
               "BNLL", "Threshold", "ArgMax", "Reduction", "Tile", "Crop", "Scale", "Bias", "BatchNorm",
               "LRN", "MVN", "PReLU", "ELU", "Deconvolution", "Silence", "MemoryData", "Data", "DummyData",
               "Python", "Input", "Permute", "Normalize", "PriorBox", "Upsample", "Bogus"]


def hostile_int(rng: random.Random) -> str:
    return rng.choice(HOSTILE_INTS)


def hostile_float(rng: random.Random) -> str:
    return rng.choice(HOSTILE_FLOATS)


# --- commands ------------------------------------------------------------------------------

def _weights_args(ctx: Ctx, seed: Seed, weights: Optional[str]) -> list[str]:
    if weights is not None:
        return ["--weights", weights]
    if seed.weights is not None and ctx.rng.random() < 0.6:
        return ["--weights", str(seed.weights)]
    return ["--random-weights", str(ctx.rng.randrange(1000))]


def command(ctx: Ctx, seed: Seed, prototxt: str, weights: Optional[str] = None,
            extra: tuple[str, ...] = (), choices: Optional[list[str]] = None) -> list[str]:
    """A command line that loads ``prototxt`` the way ``seed`` is meant to be run."""
    if seed.python_layers:
        ctx.env["PYTHONPATH"] = PYTHON_LAYERS
    options = choices or (["run"] * 6 + ["partition"] * 2 + ["export", "diff", "build", "compare"]
                          if seed.runnable else ["partition"] * 3 + ["export"])
    cmd = ctx.rng.choice(options)
    w = _weights_args(ctx, seed, weights)
    if cmd == "partition":
        return ["partition", prototxt, *extra]
    if cmd == "export":
        return ["export", prototxt, *w, "-o", "exported", *extra]
    if cmd == "build":
        return ["build", prototxt, *w, "--engine-cache", "cache", "--tensorrt-module", "tensorrt_rtx", *extra]
    if cmd == "diff":
        return ["diff", prototxt, *w, *extra]
    if cmd == "compare":
        return ["compare", prototxt, *w, "--partition", "caffe", "--partition", "profile=tensorrt,min=1",
                "--runs", "1", "--warmup", "0", *extra]
    return ["run", prototxt, *w, "--check", *extra]


# --- model text ----------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<=: )-?\d+(\.\d+)?(e-?\d+)?\b")
_ENUM = re.compile(r"(?<=: )[A-Z_]{3,}\b")
_TYPE = re.compile(r'(?<=type: ["\'])[A-Za-z]+(?=["\'])')
_BLOB = re.compile(r'(?<=bottom: ["\'])[^"\']+(?=["\'])|(?<=top: ["\'])[^"\']+(?=["\'])')


def _mutate_text(rng: random.Random, text: str) -> tuple[str, str]:
    lines = text.split("\n")
    op = rng.choice(["delete", "duplicate", "swap", "int", "float", "enum", "type", "blob", "truncate", "garbage"])
    if op in ("delete", "duplicate", "swap") and len(lines) > 2:
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines), f"{op} line {i + 1}"
    pattern, values = {"int": (_NUMBER, HOSTILE_INTS), "float": (_NUMBER, HOSTILE_FLOATS), "enum": (_ENUM, ENUMS),
                       "type": (_TYPE, LAYER_TYPES)}.get(op, (None, None))
    if op == "blob":
        pattern, values = _BLOB, sorted(set(m.group(0) for m in _BLOB.finditer(text))) + ["nowhere"]
    if pattern is not None:
        found = list(pattern.finditer(text))
        if found:
            m = rng.choice(found)
            new = rng.choice(values)
            return text[:m.start()] + new + text[m.end():], f"{op} {m.group(0)!r} -> {new!r} at offset {m.start()}"
    if op == "garbage":
        at = rng.randrange(len(text) + 1)
        junk = rng.choice(["{", "}", "\x00", "\xff", "layer {", '"', "\\", "#", "\u202e", "\n" * 3])
        return text[:at] + junk + text[at:], f"insert {junk!r} at offset {at}"
    at = rng.randrange(len(text) + 1)
    return text[:at], f"truncate at offset {at}"


def prototxt_text(ctx: Ctx) -> Case:
    """Line and token mutations of a seed prototxt (numbers, enums, layer types, blob names)."""
    seed = ctx.rng.choice(SEEDS)
    text = seed.prototxt.read_text()
    steps = []
    for _ in range(ctx.rng.choice([1, 1, 2, 3])):
        text, step = _mutate_text(ctx.rng, text)
        steps.append(step)
    name = ctx.write("model.prototxt", text.encode("utf-8", "surrogateescape"))
    return Case("prototxt_text", f"{seed.name}: {'; '.join(steps)}", command(ctx, seed, name))


def _after(layer_type: str, params: str = "", tops: str = 'top: "inj"') -> str:
    """A layer reading BOTTOM (replaced by the model's last top)."""
    return f'layer {{ name: "inj" type: "{layer_type}" bottom: "BOTTOM" {tops} {params} }}'


def _python(layer: str, module: str = "hostile_layers") -> str:
    return _after("Python", f'python_param {{ module: "{module}" layer: "{layer}" }}')


# Layers appended after a small model's last layer.
INJECTED = {
    "stochastic pooling": _after("Pooling", "pooling_param { pool: STOCHASTIC kernel_size: 1 }"),
    "power nan": _after("Power", "power_param { power: 0.5 scale: 0 shift: -1 }"),
    "log": _after("Log"),
    "exp overflow": _after("Exp", "exp_param { scale: 1000 }"),
    "reshape fixed batch": _after("Reshape", "reshape_param { shape { dim: 1 dim: -1 } }"),
    "reshape bad count": _after("Reshape", "reshape_param { shape { dim: 0 dim: 7 dim: 3 } }"),
    "slice batch axis": _after("Slice", "slice_param { axis: 0 slice_point: 1 }", 'top: "inj" top: "inj2"'),
    "softmax bad axis": _after("Softmax", "softmax_param { axis: 7 }"),
    "huge inner product": _after("InnerProduct", "inner_product_param { num_output: 2000000000 }"),
    "zero inner product": _after("InnerProduct", "inner_product_param { num_output: 0 }"),
    "argmax": _after("ArgMax", "argmax_param { top_k: 3 }"),
    "threshold": _after("Threshold", "threshold_param { threshold: 0.5 }"),
    "tile": _after("Tile", "tile_param { axis: 1 tiles: 3 }"),
    "python raises in forward": _python("RaiseInForward"),
    "python raises in setup": _python("RaiseInSetup"),
    "python wrong top shape": _python("WrongShape"),
    "python raises sometimes": _python("RaiseOnSecondCall"),
    "python missing module": _python("X", module="no_such_module"),
    "python multi-line error": _python("MultiLineError"),
    "python unprintable error": _python("UnprintableError"),
    "python exits in setup": _python("ExitInSetup"),
    "python starts a helper": _python("StartsAHelper"),
    "python grows its top": _python("GrowsInForward"),
    "in-place convolution": 'layer { name: "inj" type: "Convolution" bottom: "BOTTOM" top: "BOTTOM" '
                            'convolution_param { num_output: 2 kernel_size: 1 } }',
    "in-place pooling": 'layer { name: "inj" type: "Pooling" bottom: "BOTTOM" top: "BOTTOM" '
                        'pooling_param { kernel_size: 2 stride: 1 } }',
    "dropout train phase": _after("Dropout", "phase: TRAIN"),
    "batchnorm train phase": _after("BatchNorm", "phase: TRAIN"),
    "eltwise of two shapes": 'layer { name: "injp" type: "Pooling" bottom: "BOTTOM" top: "injp" '
                             'pooling_param { kernel_size: 2 stride: 2 } }\n'
                             'layer { name: "inj" type: "Eltwise" bottom: "BOTTOM" bottom: "injp" top: "inj" }',
    "memory data": 'layer { name: "inj" type: "MemoryData" top: "inj" top: "inj_label" '
                   'memory_data_param { batch_size: 1 channels: 1 height: 4 width: 4 } }',
    "input without shape": 'layer { name: "inj" type: "Input" top: "inj" }',
    "input zero dim": 'layer { name: "inj" type: "Input" top: "inj" input_param { shape { dim: 1 dim: 0 } } }',
    "duplicate name": 'layer { name: "LASTNAME" type: "ReLU" bottom: "BOTTOM" top: "inj" }',
    "dangling bottom": 'layer { name: "inj" type: "ReLU" bottom: "nowhere" top: "inj" }',
    "data layer": 'layer { name: "inj" type: "Data" top: "inj" data_param { source: "/nonexistent" batch_size: 1 } }',
    "dummy data": 'layer { name: "inj" type: "DummyData" top: "inj" dummy_data_param { shape { dim: 1 dim: 2 } } }',
}

HOSTILE_LAYERS = '''
import caffe


class RaiseInForward(caffe.Layer):
    def setup(self, bottom, top): pass
    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
    def forward(self, bottom, top): raise ValueError("hostile layer: forward refuses")


class RaiseInSetup(caffe.Layer):
    def setup(self, bottom, top): raise RuntimeError("hostile layer: setup refuses")
    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
    def forward(self, bottom, top): pass


class WrongShape(caffe.Layer):
    def setup(self, bottom, top): pass
    def reshape(self, bottom, top): top[0].reshape(2, 3)
    def forward(self, bottom, top): top[0].data[...] = bottom[0].data.reshape(-1)[:6].reshape(2, 3)


class RaiseOnSecondCall(caffe.Layer):
    calls = 0
    def setup(self, bottom, top): pass
    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
    def forward(self, bottom, top):
        type(self).calls += 1
        if type(self).calls > 1:
            raise ArithmeticError("hostile layer: second call refused")
        top[0].data[...] = bottom[0].data


class Copy(caffe.Layer):
    def setup(self, bottom, top): pass
    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
    def forward(self, bottom, top): top[0].data[...] = bottom[0].data


class MultiLineError(Copy):
    def forward(self, bottom, top): raise ValueError("first line\\nsecond line\\n\\tthird")


class UnprintableError(Copy):
    def forward(self, bottom, top):
        class Unprintable(Exception):
            def __str__(self): raise RuntimeError("no message")
        raise Unprintable()


class ExitInSetup(Copy):
    def setup(self, bottom, top): raise SystemExit(3)


class StartsAHelper(Copy):
    """Starts a long-lived helper process at set-up (its id appended to the file named by
    param_str, when there is one), holding the standard error it inherited."""
    def setup(self, bottom, top):
        import subprocess
        helper = subprocess.Popen(["sleep", "600"])
        if self.param_str:
            with open(self.param_str, "a") as f:
                f.write(f"{helper.pid}\\n")


class GrowsInForward(Copy):
    """Its top gets two more rows in forward than reshape said."""
    def forward(self, bottom, top):
        shape = list(bottom[0].data.shape)
        shape[-2] += 2
        top[0].reshape(*shape)
        top[0].data[...] = 1


class RandomOutput(Copy):
    """Other numbers at every forward, in Caffe as in the hybrid."""
    def forward(self, bottom, top):
        import numpy as np
        top[0].data[...] = np.random.rand(*top[0].data.shape)
'''


def _last_layer(text: str) -> tuple[str, str]:
    tops = re.findall(r'top: *["\']([^"\']+)["\']', text) or ["data"]
    names = re.findall(r'name: *["\']([^"\']+)["\']', text) or ["data"]
    return tops[-1], names[-1]


def injected_layer(ctx: Ctx) -> Case:
    """A small model with one layer appended that Caffe or the hybrid finds hard (aborts at
    forward, NaN outputs, Python layers that raise, fixed batch sizes, missing shapes)."""
    seed = ctx.rng.choice([s for s in SMALL if not s.python_layers] or SMALL)
    kind = ctx.rng.choice(sorted(INJECTED))
    text = seed.prototxt.read_text()
    bottom, last_name = _last_layer(text)
    text += "\n" + INJECTED[kind].replace("BOTTOM", bottom).replace("LASTNAME", last_name) + "\n"
    name = ctx.write("model.prototxt", text)
    ctx.write("layers/hostile_layers.py", HOSTILE_LAYERS)
    ctx.env["PYTHONPATH"] = f"{ctx.folder / 'layers'}:{PYTHON_LAYERS}"
    extra = tuple(ctx.rng.choice([[], [], ["--batch", "2"], ["--batch", "3"], ["--min-segment-size", "1"],
                                  ["--fallback", "inj"]]))
    return Case("injected_layer", f"{seed.name} + {kind} {' '.join(extra)}",
                command(ctx, seed, name, extra=extra))


V1_TEMPLATE = '''name: "v1net"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 8
input_dim: 8
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "pool" type: POOLING bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "fc" type: INNER_PRODUCT bottom: "pool" top: "fc" inner_product_param { num_output: 5 } }
layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
'''


def v1_model(ctx: Ctx) -> Case:
    """Old-format (V1) prototxts, upgraded by Caffe's tool on every load (which must leave
    no log files behind), sometimes mutated."""
    text, step = V1_TEMPLATE, "as written"
    if ctx.rng.random() < 0.6:
        text, step = _mutate_text(ctx.rng, text)
    name = ctx.write("v1.prototxt", text)
    seed = Seed("v1", Path(name))
    return Case("v1_model", f"V1 prototxt, {step}", command(ctx, seed, name, choices=["run", "run", "partition"]))


def _first_input(text: str) -> tuple[str, list[int]]:
    """The first input's name and shape as the prototxt writes them (legacy fields or Input)."""
    legacy = re.search(r'^input: *["\']([^"\']+)["\']', text, re.M)
    if legacy:
        dims = re.findall(r"^input_dim: *(\d+)", text, re.M)[:4] or re.findall(r"dim: *(\d+)", text)[:4]
        return legacy.group(1), [int(d) for d in dims]
    layer = re.search(r'type: *["\']Input["\'].*?top: *["\']([^"\']+)["\'].*?shape *:? *\{([^}]*)\}', text, re.S)
    if layer:
        return layer.group(1), [int(d) for d in re.findall(r"dim: *(\d+)", layer.group(2))]
    return "data", [1, 3, 8, 8]


def input_shape(ctx: Ctx) -> Case:
    """--input-shape on every kind of seed: spatial sizes halved, doubled, 1x1, tiny, absurd,
    another batch, another rank; big nets become cheap to run, or refuse their size."""
    rng = ctx.rng
    seed = rng.choice(SEEDS)
    name, dims = _first_input(seed.prototxt.read_text())
    dims = dims or [1, 3, 8, 8]
    how = rng.choice(["half", "double", "ones", "small", "absurd", "batch 3", "drop axis", "add axis", "as is"])
    new = list(dims)
    if how == "half":
        new = dims[:2] + [max(1, d // 2) for d in dims[2:]]
    elif how == "double" and seed.runnable:
        new = dims[:2] + [2 * d for d in dims[2:]]
    elif how == "ones":
        new = dims[:2] + [1 for _ in dims[2:]]
    elif how == "small":
        new = dims[:2] + [rng.choice([3, 7, 17, 33]) for _ in dims[2:]]
    elif how == "absurd":
        new = dims[:2] + [rng.choice([10**5, 2**31 - 1]) for _ in dims[2:]]
    elif how == "batch 3":
        new = [3] + dims[1:]
    elif how == "drop axis":
        new = dims[:-1]
    elif how == "add axis":
        new = dims + [2]
    spec = f"{name}={'x'.join(map(str, new))}"
    small_enough = seed.runnable or (len(new) == 4 and new[2] * new[3] <= 64 * 64)
    cmd = command(ctx, Seed(seed.name, seed.prototxt, seed.weights, runnable=small_enough,
                            python_layers=seed.python_layers), str(seed.prototxt), extra=("--input-shape", spec))
    return Case("input_shape", f"{seed.name}: --input-shape {spec} ({how})", cmd)


# --- weights ----------------------------------------------------------------------------------

def caffemodel_bytes(ctx: Ctx) -> Case:
    """Damaged or mismatched caffemodels: truncated, bits flipped, junk appended, empty, another
    model's weights, a prototxt given as weights."""
    seed = ctx.rng.choice(TRAINED)
    data = seed.weights.read_bytes()
    op = ctx.rng.choice(["truncate", "flip", "append", "empty", "other", "prototxt", "zeros"])
    if op == "truncate":
        data = data[:ctx.rng.randrange(len(data))]
    elif op == "flip":
        data = bytearray(data)
        for _ in range(ctx.rng.choice([1, 4, 64])):
            i = ctx.rng.randrange(len(data))
            data[i] ^= 1 << ctx.rng.randrange(8)
        data = bytes(data)
    elif op == "append":
        data += bytes(ctx.rng.randrange(256) for _ in range(ctx.rng.choice([1, 17, 1000])))
    elif op == "empty":
        data = b""
    elif op == "other":
        data = ctx.rng.choice([s for s in TRAINED if s is not seed] or TRAINED).weights.read_bytes()
    elif op == "prototxt":
        data = seed.prototxt.read_bytes()
    else:
        data = bytes(ctx.rng.choice([8, 4096]))
    name = ctx.write("weights.caffemodel", data)
    return Case("caffemodel_bytes", f"{seed.name}: weights {op}",
                command(ctx, seed, str(seed.prototxt), weights=name, choices=["run", "run", "export", "build"]))


# --- input files ------------------------------------------------------------------------------

def _npy_header(shape: tuple, descr: str = "<f4", body: bytes = b"") -> bytes:
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, shape)
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body


def _png(width: int, height: int, payload: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


def _hostile_input(ctx: Ctx, seed: Seed, shape: tuple[int, ...]) -> tuple[str, str]:
    rng = ctx.rng
    kind = rng.choice(["good npy", "empty file", "huge header", "truncated npy", "npz renamed", "0-d", "empty batch",
                       "int npy", "object npy", "wrong shape", "fortran npy", "nan npy", "bad magic",
                       "png bomb", "png bomb 2", "pgm maxval 0", "truncated png", "random bytes png", "zero png",
                       "fifo", "folder", "symlink loop", "long name", "missing", "sample", "text as npy",
                       "npy v2 header", "unknown suffix", "negative dims npy", "beyond float32 npy", "16-bit png",
                       "float tiff"])
    f = ctx.folder
    if kind == "good npy":
        np.save(f / "in.npy", np.random.default_rng(rng.randrange(99)).standard_normal(shape).astype(np.float32))
    elif kind == "empty file":
        ctx.write("in.npy", b"")
    elif kind == "huge header":
        ctx.write("in.npy", _npy_header((10**6, 10**6, 10**6), body=b"\0" * 64))
    elif kind == "truncated npy":
        np.save(f / "full.npy", np.ones(shape, np.float32))
        data = (f / "full.npy").read_bytes()
        ctx.write("in.npy", data[:rng.randrange(len(data))])
    elif kind == "npz renamed":
        np.savez(f / "arch.npz", x=np.ones(shape, np.float32))
        os.rename(f / "arch.npz", f / "in.npy")
    elif kind == "0-d":
        np.save(f / "in.npy", np.float32(1.5))
    elif kind == "empty batch":
        np.save(f / "in.npy", np.zeros((0, *shape[1:]), np.float32))
    elif kind == "int npy":
        np.save(f / "in.npy", np.ones(shape, np.int32))
    elif kind == "object npy":
        np.save(f / "in.npy", np.array([1, "x"], dtype=object), allow_pickle=True)
    elif kind == "wrong shape":
        np.save(f / "in.npy", np.ones((1, 2, 3), np.float32))
    elif kind == "fortran npy":
        np.save(f / "in.npy", np.asfortranarray(np.random.default_rng(1).standard_normal(shape).astype(np.float32)))
    elif kind == "nan npy":
        np.save(f / "in.npy", np.full(shape, np.nan, np.float32))
    elif kind == "bad magic":
        ctx.write("in.npy", b"\x93NUMPX\x01\x00" + bytes(100))
    elif kind == "npy v2 header":
        ctx.write("in.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + b"{")
    elif kind == "text as npy":
        ctx.write("in.npy", "1 2 3\n")
    elif kind == "png bomb":
        ctx.write("in.png", _png(60000, 60000))
    elif kind == "png bomb 2":
        ctx.write("in.png", _png(10000, 10000))
    elif kind == "pgm maxval 0":
        ctx.write("in.pgm", b"P5\n4 4\n0\n" + bytes(16))
    elif kind == "truncated png":
        png = seed.samples and seed.samples[0].suffix == ".png"
        data = seed.samples[0].read_bytes() if png else _png(4, 4, bytes(20))
        ctx.write("in.png", data[:rng.randrange(8, max(9, len(data)))])
    elif kind == "random bytes png":
        ctx.write("in.png", bytes(rng.randrange(256) for _ in range(200)))
    elif kind == "zero png":
        ctx.write("in.png", b"")
    elif kind == "fifo":
        os.mkfifo(f / "in.npy")
    elif kind == "folder":
        (f / "in.npy").mkdir()
    elif kind == "symlink loop":
        os.symlink("in.npy", f / "in.npy")
    elif kind == "long name":
        return kind, "x" * 300 + ".npy"
    elif kind == "missing":
        return kind, "absent.npy"
    elif kind == "sample" and seed.samples:
        return kind, str(rng.choice(seed.samples))
    elif kind == "unknown suffix":
        ctx.write("in.txt", "1 2 3")
        return kind, "in.txt"
    elif kind == "negative dims npy":
        ctx.write("in.npy", _npy_header((-2, *shape[1:]), body=bytes(64)))
    elif kind == "beyond float32 npy":
        np.save(f / "in.npy", np.full(shape, rng.choice([1e39, -1e300, 3.5e38])))
    elif kind in ("16-bit png", "float tiff"):
        from PIL import Image
        height, width = (shape[2], shape[3]) if len(shape) == 4 else (8, 8)
        values = np.random.default_rng(rng.randrange(99)).integers(0, 65536, (height, width), dtype=np.uint16)
        suffix = ".png" if kind == "16-bit png" else ".tiff"
        Image.fromarray(values if kind == "16-bit png" else values.astype(np.float32)).save(f / f"in{suffix}")
        return kind, f"in{suffix}"
    else:
        np.save(f / "in.npy", np.ones(shape, np.float32))
    name = next((n for n in ("in.npy", "in.png", "in.pgm") if os.path.lexists(f / n)), "in.npy")
    return kind, name


_SHAPES = {"lenet_digits": (1, 1, 16, 16), "lenet_mnist": (1, 1, 28, 28), "cifar10_full": (1, 3, 32, 32),
           "mtcnn_det1": (1, 3, 12, 12), "mtcnn_det2": (1, 3, 24, 24), "mtcnn_det3": (1, 3, 48, 48),
           "fsrcnn": (1, 1, 7, 7), "python_layer_net": (1, 3, 32, 32)}


def input_file(ctx: Ctx) -> Case:
    """Hostile --input files: .npy with lying headers, renamed archives, 0-d and empty arrays,
    wrong dtypes, image bombs, damaged images, FIFOs, folders, link loops, long names."""
    seed = ctx.rng.choice([s for s in SMALL if s.name in _SHAPES])
    kind, name = _hostile_input(ctx, seed, _SHAPES[seed.name])
    extra = ["--input", name, *seed.input_args]
    if ctx.rng.random() < 0.3:
        extra += ctx.rng.choice([["--batch", "2"], ["--resize", "8x8"], ["--channel-order", "rgb"],
                                 ["--mean", "1", "2"]])
    return Case("input_file", f"{seed.name}: input {kind}",
                command(ctx, seed, str(seed.prototxt), extra=tuple(extra), choices=["run", "run", "run", "diff"]),
                nan_inputs=kind == "nan npy")


def labels_file(ctx: Ctx) -> Case:
    """--labels that is missing, a folder, a FIFO, not UTF-8, empty, of the wrong length, or fine."""
    seed = next(s for s in SEEDS if s.name == "lenet_digits")
    kind = ctx.rng.choice(["fine", "fine, final newline", "missing", "folder", "fifo", "latin-1", "empty", "binary",
                           "bom", "long lines", "one class short"])
    name = "labels.txt"
    if kind.startswith("fine") or kind == "one class short":
        count = 9 if kind == "one class short" else 10
        ctx.write(name, "\n".join(f"digit {i}" for i in range(count)) + ("\n" if kind.endswith("newline") else ""))
    elif kind == "folder":
        (ctx.folder / name).mkdir()
    elif kind == "fifo":
        os.mkfifo(ctx.folder / name)
    elif kind == "latin-1":
        ctx.write(name, "z\xe9ro\nun\n".encode("latin-1"))
    elif kind == "empty":
        ctx.write(name, b"")
    elif kind == "binary":
        ctx.write(name, bytes(range(256)))
    elif kind == "bom":
        ctx.write(name, "\ufeffzero\none\n")
    elif kind == "long lines":
        ctx.write(name, ("x" * 100000 + "\n") * 3)
    return Case("labels_file", f"--labels {kind}", ["run", str(seed.prototxt), "--weights", str(seed.weights),
                                                      "--labels", name, "--top", "3"])


# --- command lines ----------------------------------------------------------------------------

NUMERIC_OPTIONS = {
    "run": ["--batch", "--random-weights", "--min-segment-size", "--tolerance", "--top", "--workspace", "--max-batch",
            "--opt-batch", "--timing-iterations", "--opt-level", "--scale", "--mean", "--device", "--resize",
            "--input-shape"],
    "compare": ["--batch", "--runs", "--warmup", "--tolerance", "--min-segment-size", "--random-weights"],
    "diff": ["--batch", "--tolerance", "--min-segment-size", "--random-weights"],
    "build": ["--workspace", "--max-batch", "--opt-batch", "--timing-iterations", "--random-weights"],
    "partition": ["--min-segment-size", "--input-shape"],
}


def option_value(ctx: Ctx) -> Case:
    """A numeric option with a hostile value: 0, negative, nan, inf, beyond int32, 20 digits,
    not a number, or --opt-batch above --max-batch."""
    rng = ctx.rng
    seed = next(s for s in SEEDS if s.name == "lenet_digits")
    cmd = rng.choice(sorted(NUMERIC_OPTIONS))
    option = rng.choice(NUMERIC_OPTIONS[cmd])
    value = rng.choice([hostile_int(rng), hostile_float(rng)])
    if option == "--resize":
        value = rng.choice(["0x0", "1x1", "100000x100000", "8x", "x8", "-3x4", "16x16", "99999999999999999999x1"])
    elif option == "--input-shape":
        value = rng.choice(["data=1x1x16x16", "data=1x1x99999999999999999999x16", "data=1x0x2", "data=", "=1x2",
                            "data=2x1x32x32", "data=1x1x4x4", "data=1x1x1x1", "data=1x1x3000x3000",
                            "data=1x1x100000x100000", "nothere=1x1x16x16", "data=1x1x16x16x2"])
    base = ["--weights", str(seed.weights)] if cmd != "partition" else []
    if option == "--random-weights":
        base = []
    argv = [cmd, str(seed.prototxt), *base, option, value]
    if option in ("--opt-batch", "--max-batch") and rng.random() < 0.5:
        argv += ["--max-batch", "2", "--opt-batch", "4"] if option == "--opt-batch" else ["--opt-batch", "8"]
    if cmd == "compare":
        argv += ["--partition", "caffe", "--runs", "1", "--warmup", "0"] if option not in ("--runs", "--warmup") \
            else ["--partition", "caffe"]
    if cmd == "build":
        argv += ["--engine-cache", "cache", "--tensorrt-module", "tensorrt_rtx"]
    if cmd == "run" and option not in ("--tolerance",) and rng.random() < 0.5:
        argv.append("--check")
    return Case("option_value", f"{cmd} {option} {value!r}", argv)


def command_line(ctx: Ctx) -> Case:
    """Malformed command lines: unknown commands and options, missing values, options of
    another command, both weight options, empty strings."""
    seed = next(s for s in SEEDS if s.name == "lenet_digits")
    m, w = str(seed.prototxt), str(seed.weights)
    argv = ctx.rng.choice([
        [], ["bogus"], ["run"], ["run", m, "--weights"], ["run", m, "--weights", w, "--random-weights", "1"],
        ["partition", m, "--check"], ["run", m, "--weights", w, "--engine", "cuda"],
        ["run", "", "--random-weights", "1"],
        ["run", m, "--weights", ""], ["--debug"], ["run", m, "--random-weights", "1", "--input", "="],
        ["run", m, "--random-weights", "1", "--input", "nothere=x.npy"], ["compare", m, "--random-weights", "1",
                                                                          "--partition", "profile=bogus"],
        ["compare", m, "--random-weights", "1", "--partition", "min=x"],
        ["run", m, "--random-weights", "1", "--fallback"],
        ["run", m, "--random-weights", "1", "--output-blob", "nothere"], ["partition", m, "--format", "pdf"],
        ["run", m, "--random-weights", "1", "--profile", "x"], ["run", m, "--random-weights", "1", "--", "x"],
        ["partition", m, "--fallback", "Convolution", "--require-full"], ["export", m, "--random-weights", "1"],
        ["run", m, "--random-weights", "1", "--channel-order", "grb"], ["build", m, "--tensorrt-module", "tensorrt9"],
        ["run", m, "--weights", w, "--device", "0"], ["run", m, "--weights", w, "--engine", "tensorrt"],
        ["run", m, "--weights", w, "--input-shape", "data=1x1x16x16", "--input-shape", "data=2x1x16x16"],
        ["build", m, "--weights", w, "--engine-cache", ""], ["build", m, "--weights", w, "--engine-cache", "~nouser_x/c"],
        ["compare", m, "--weights", w, "--partition", "fallback=+"], ["run", m, "--weights", w, "--mean", "1", "2"],
        ["run", m, "--weights", w, "--input", ""], ["run", m, "--weights", w, "-o", "new.npz/"],
        ["run", m, "--weights", w, "-o", w], ["partition", m, "-o", m], ["run", m, "--weights", w, "--input", "a\nb"],
    ])
    return Case("command_line", " ".join(argv) or "(no arguments)", list(argv))


# --- output paths and model paths -------------------------------------------------------------

def _special(ctx: Ctx, kind: str, name: str) -> list[str]:
    """Make ``name`` a special file of ``kind``; return the names whose identity must hold."""
    f = ctx.folder / name
    if kind == "fifo":
        os.mkfifo(f)
    elif kind == "char device" and IS_ROOT:
        os.mknod(f, 0o666 | 0o020000, os.makedev(1, 7))  # like /dev/full, made here, never the real one
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(f))
        sock.close()
    elif kind == "symlink to file":
        ctx.write("target.out", b"old")
        os.symlink("target.out", f)
    elif kind == "dangling symlink":
        os.symlink("nowhere/target.out", f)
    elif kind == "symlink loop":
        os.symlink(name, f)
    elif kind == "symlink to fifo":
        os.mkfifo(ctx.folder / "pipe")
        os.symlink("pipe", f)
        return [name, "pipe"]
    elif kind == "folder":
        f.mkdir()
    elif kind == "file as parent":
        ctx.write("afile", b"x")
    elif kind == "read-only folder":
        (ctx.folder / "ro").mkdir()
        (ctx.folder / "ro").chmod(0o500)
    else:
        return []
    return [name] if os.path.lexists(f) else []


def output_path(ctx: Ctx) -> Case:
    """-o, --json, --plot and export folders pointing at FIFOs, device nodes, sockets,
    symlinks (written through), folders, missing or read-only folders, /proc, long names."""
    rng = ctx.rng
    seed = next(s for s in SEEDS if s.name == "lenet_digits")
    kind = rng.choice(["fifo", "char device", "socket", "symlink to file", "dangling symlink", "symlink loop",
                       "symlink to fifo", "folder", "file as parent", "missing folder", "proc", "long name",
                       "read-only folder", "plain"])
    name = {"file as parent": "afile/out", "missing folder": "no/such/out", "proc": "/proc/self/out",
            "long name": "o" * 300, "read-only folder": "ro/out"}.get(kind, "out")
    specials = _special(ctx, kind, name)
    cmd = rng.choice(["partition", "run", "run", "diff", "compare", "export", "compare-plot"])
    m, w = str(seed.prototxt), ["--weights", str(seed.weights)]
    if cmd == "partition":
        argv = ["partition", m, "-o", name]
    elif cmd == "run":
        argv = ["run", m, *w, "-o", name]
    elif cmd == "diff":
        argv = ["diff", m, *w, "--json", name]
    elif cmd == "export":
        argv = ["export", m, *w, "-o", name]
    else:
        plot = cmd == "compare-plot"
        if plot and kind in ("plain", "symlink to file"):
            name += ".png"
            specials = _special(ctx, kind, name) if kind == "symlink to file" else []
        argv = ["compare", m, *w, "--partition", "caffe", "--runs", "1", "--warmup", "0",
                "--plot" if plot else "--json", name]
    return Case("output_path", f"{cmd} to {kind}", argv, specials=specials,
                export_dir=name if cmd == "export" and not name.startswith("/") else None)


def model_path(ctx: Ctx) -> Case:
    """The prototxt or caffemodel path is missing, a folder, a FIFO, a device, a link loop,
    too long, empty, binary, not UTF-8, or deeply nested text."""
    rng = ctx.rng
    seed = next(s for s in SEEDS if s.name == "lenet_digits")
    which = rng.choice(["prototxt", "weights"])
    kind = rng.choice(["missing", "folder", "fifo", "char device", "symlink loop", "long name", "empty", "binary",
                       "latin-1", "deep nesting", "huge line"])
    name = "model.prototxt" if which == "prototxt" else "model.caffemodel"
    specials: list[str] = []
    if kind in ("folder", "fifo", "symlink loop") or (kind == "char device" and IS_ROOT):
        specials = _special(ctx, kind, name)
    elif kind == "long name":
        name = "m" * 300
    elif kind == "empty":
        ctx.write(name, b"")
    elif kind == "binary":
        ctx.write(name, bytes(rng.randrange(256) for _ in range(512)))
    elif kind == "latin-1":
        ctx.write(name, 'name: "caf\xe9"\n'.encode("latin-1"))
    elif kind == "deep nesting":
        ctx.write(name, "layer { " * 5000 + "}" * 5000)
    elif kind == "huge line":
        ctx.write(name, 'name: "' + "x" * 5_000_000 + '"\n')
    argv = (["run", name, "--random-weights", "1"] if which == "prototxt"
            else ["run", str(seed.prototxt), "--weights", name])
    return Case("model_path", f"{which} is {kind}", argv, specials=specials)


# --- the engine cache -------------------------------------------------------------------------

def engine_cache(ctx: Ctx) -> Case:
    """A cache folder as found on disk: a built entry whose sidecar or plan was damaged or
    replaced by a FIFO, a device, a link, a folder; or an unusable cache folder."""
    rng = ctx.rng
    seed = next(s for s in SEEDS if s.name == "lenet_digits")
    cache = ctx.folder / "cache"
    kind = rng.choice(["json list", "json string", "wrong types", "engine not object", "not json", "plan truncated",
                       "plan flipped", "plan fifo", "plan device", "plan symlink", "sidecar fifo", "sidecar folder",
                       "plan folder", "sidecar huge size", "cache is a file", "cache is a fifo", "cache path too long",
                       "cache in /proc", "intact", "sparse plan of 12 GiB", "stale staged file", "cache under ~nouser",
                       "bad TensorRT variable"])
    specials: list[str] = []
    cache_arg = "cache"
    if ctx.golden_cache is not None and kind not in ("cache is a file", "cache is a fifo", "cache path too long",
                                                    "cache in /proc"):
        shutil.copytree(ctx.golden_cache, cache)
        plan = next(cache.glob("*.plan"))
        meta = plan.with_suffix(".json")
        m = json.loads(meta.read_text())
        if kind == "json list":
            meta.write_text("[1, 2]")
        elif kind == "json string":
            meta.write_text('"sidecar"')
        elif kind == "wrong types":
            m[rng.choice(["plan_size", "plan_sha256", "format", "key"])] = rng.choice([None, "12", True, [], {}, -5])
            meta.write_text(json.dumps(m))
        elif kind == "engine not object":
            m["engine"] = rng.choice([[], "x", None, {"input_names": "abc"}])
            meta.write_text(json.dumps(m))
        elif kind == "not json":
            meta.write_bytes(b"\xff\xfe{")
        elif kind == "sidecar huge size":
            m["plan_size"] = 10**15
            meta.write_text(json.dumps(m))
        elif kind == "sparse plan of 12 GiB":
            m["plan_size"] = 12 * 2**30
            meta.write_text(json.dumps(m))
            os.truncate(plan, m["plan_size"])
        elif kind == "stale staged file":
            (cache / f".{plan.name}.999999999.abcdefgh.tmp").write_bytes(b"half a plan")
        elif kind == "plan truncated":
            plan.write_bytes(plan.read_bytes()[:100])
        elif kind == "plan flipped":
            data = bytearray(plan.read_bytes())
            data[len(data) // 2] ^= 0xFF
            plan.write_bytes(bytes(data))
        else:
            target = plan if kind.startswith("plan") else meta
            target.unlink()
            rel = str(target.relative_to(ctx.folder))
            if kind.endswith("fifo"):
                os.mkfifo(target)
            elif kind.endswith("folder"):
                target.mkdir()
            elif kind == "plan device" and IS_ROOT:
                os.mknod(ctx.folder / "zero", 0o666 | 0o020000, os.makedev(1, 5))
                os.symlink(ctx.folder / "zero", target)
                specials = ["zero"]
            elif kind == "plan symlink":
                ctx.write("elsewhere.plan", b"not a plan")
                os.symlink(ctx.folder / "elsewhere.plan", target)
            specials = specials or ([rel] if os.path.lexists(target) and kind != "plan symlink" else [])
    elif kind == "cache is a file":
        ctx.write("cache", b"x")
    elif kind == "cache is a fifo":
        os.mkfifo(cache)
        specials = ["cache"]
    elif kind == "cache path too long":
        cache_arg = "/".join(["c" * 200] * 25)
    elif kind == "cache in /proc":
        cache_arg = "/proc/self/engine-cache"
    argv = ["build", str(seed.prototxt), "--weights", str(seed.weights), "--engine-cache", cache_arg,
            "--tensorrt-module", "tensorrt_rtx"]
    if kind == "cache under ~nouser":
        argv = argv[:4] + ["--tensorrt-module", "tensorrt_rtx"]
        ctx.env["HYBRID_INFER_ENGINE_CACHE"] = "~nouser_x/cache"
    elif kind == "bad TensorRT variable":
        argv = argv[:-2]
        ctx.env["HYBRID_INFER_TENSORRT"] = "tensorrt9"
    # A replaced folder entry is junk to the cache: it may be rebuilt over, so only devices
    # and FIFOs outside the cache's own entries must keep their identity.
    keep = [s for s in specials if not s.startswith("cache/")]
    return Case("engine_cache", f"cache {kind}", argv, specials=keep)


# --- the Python API ---------------------------------------------------------------------------

API_CALLS = [
    "hybrid_infer.load(123)", "hybrid_infer.load(None)", "hybrid_infer.load(b'x.prototxt')",
    "hybrid_infer.load(M, random_weights='1')", "hybrid_infer.load(M, random_weights=-1)",
    "hybrid_infer.load(M, random_weights=1.5)", "hybrid_infer.load(M, fallback='LRN')",
    "hybrid_infer.load(M, fallback=[1])", "hybrid_infer.load(M, min_segment_size='3')",
    "hybrid_infer.load(M, min_segment_size=-1)", "hybrid_infer.load(M, engine=5)", "hybrid_infer.load(M, profile=None)",
    "hybrid_infer.load(M, outputs='prob')", "hybrid_infer.load(M, input_shapes={'data': '1x1'})",
    "hybrid_infer.load(M, input_shapes=[1, 2])", "hybrid_infer.load(M, input_shapes={'data': (1, 0, 2)})",
    "hybrid_infer.load(M, input_shapes={'data': (1, 1, 2**40, 1)})", "hybrid_infer.load(M, device='0')",
    "hybrid_infer.load(M, build_settings={})", "hybrid_infer.load(M, engine_cache='dir')",
    "hybrid_infer.load(M, tensorrt_module=3)", "hybrid_infer.load(M, W, random_weights=True)",
    "hybrid_infer.load(M, random_weights=1).run([1, 2])", "hybrid_infer.load(M, random_weights=1).run(None)",
    "hybrid_infer.load(M, random_weights=1).run({'data': object()})",
    "hybrid_infer.load(M, random_weights=1).run({'data': 'abc'})",
    "hybrid_infer.load(M, random_weights=1).run({'data': np.zeros((0, 1, 16, 16), np.float32)})",
    "hybrid_infer.load(M, random_weights=1).run({'data': np.zeros((1, 1, 16, 16), np.int64)})",
    "hybrid_infer.load(M, random_weights=1).run({'data': np.zeros((1, 1, 16, 16), np.complex64)})",
    "hybrid_infer.load(M, random_weights=1).run({'data': np.zeros((1, 1, 15, 16), np.float32)})",
    "hybrid_infer.load(M, random_weights=1).run({'data': np.zeros((1, 1, 16, 16), np.float32), 'x': 1})",
    "hybrid_infer.load(M, random_weights=1).run({'data': np.full((2, 1, 16, 16), np.nan, np.float32)})",
    "hybrid_infer.load(M, random_weights=1).run({'data': np.ones((100000, 1, 16, 16), np.float32)[:1]})",
    "hybrid_infer.load(M, random_weights=1).run({1: np.zeros((1, 1, 16, 16), np.float32)})",
    "hybrid_infer.load(M, random_weights=1).run_caffe({'data': np.zeros((1, 1, 16, 16), np.float32)}, device='x')",
    "hybrid_infer.load(M, random_weights=1).partition_report(5)",
    "hybrid_infer.load(M, random_weights=1).partition_report('pdf')",
    "n = hybrid_infer.load(M, W); x = np.random.rand(3, 1, 16, 16).astype(np.float32); "
    "assert np.allclose(n.run({'data': x})['prob'], n.run_caffe({'data': x})['prob'], atol=1e-5)",
]


def api_call(ctx: Ctx) -> Case:
    """Python API calls with arguments of the wrong type or range (must raise the project's
    own errors, never a bare TypeError), and one correct call checked against Caffe."""
    seed = next(s for s in SEEDS if s.name == "lenet_digits")
    call = ctx.rng.choice(API_CALLS)
    code = f"M = {str(seed.prototxt)!r}; W = {str(seed.weights)!r}\n{call}"
    return Case("api_call", call, api=code)


MUTATORS: dict[str, Callable[[Ctx], Case]] = {
    "prototxt_text": prototxt_text,
    "injected_layer": injected_layer,
    "v1_model": v1_model,
    "input_shape": input_shape,
    "caffemodel_bytes": caffemodel_bytes,
    "input_file": input_file,
    "labels_file": labels_file,
    "option_value": option_value,
    "command_line": command_line,
    "output_path": output_path,
    "model_path": model_path,
    "engine_cache": engine_cache,
    "api_call": api_call,
}
#: How often each mutator is drawn (the model mutators find the most).
WEIGHTS = {"prototxt_text": 5, "injected_layer": 4, "caffemodel_bytes": 2, "input_file": 3, "option_value": 2,
           "output_path": 2, "engine_cache": 1, "api_call": 1, "model_path": 1, "labels_file": 1,
           "command_line": 1, "v1_model": 1, "input_shape": 2}


def make_case(index: int, seed: int, folder: Path, golden_cache: Optional[Path]) -> Case:
    """Case number ``index`` of the run seeded ``seed``, its files written into ``folder``."""
    rng = random.Random(seed * 1_000_003 + index)
    name = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    ctx = Ctx(rng, folder, golden_cache)
    case = MUTATORS[name](ctx)
    case.env = {**ctx.env, **case.env}
    return case
