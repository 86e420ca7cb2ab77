"""Read prototxt files into the installed Caffe's ``NetParameter``.

The result is normalised to what the rest of hybrid_infer expects: the current
``layer {}`` format (old ``layers {}`` files go through Caffe's own upgrade tool),
net inputs as ``Input`` layers, and only the layers of the TEST phase. Caffemodels are
read by ``caffemodel.py``, which needs only layer names and blobs.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from ..errors import EnvironmentProblem, ModelError
from .caffe_import import caffe, caffe_pb2

NetParameter = Any  # caffe_pb2.NetParameter of the user's Caffe
LayerParameter = Any


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{what} '{p}' does not exist or is not a file")
    return p


def _upgrade_tool(name: str) -> Path:
    """Find one of Caffe's ``upgrade_net_proto_*`` tools next to the installed pycaffe."""
    pkg = Path(caffe().__file__).resolve().parent
    for candidate in (pkg.parents[1] / "bin" / f"{name}.bin",
                      pkg.parents[1] / "build" / "tools" / f"{name}.bin",
                      pkg.parents[1] / "build" / "tools" / name):
        if candidate.is_file():
            return candidate
    raise EnvironmentProblem(
        f"this model uses Caffe's old 'layers {{}}' format and Caffe's tool {name} was not "
        f"found next to {pkg}; upgrade the file with it yourself, or install Caffe's tools")


def _upgrade_v1(path: Path) -> NetParameter:
    """Caffe's upgrade_net_proto_text on an old ``layers {}`` prototxt (its log goes to
    stderr, which is kept for the error message, never to log files in the temp folder)."""
    tool = _upgrade_tool("upgrade_net_proto_text")
    with tempfile.TemporaryDirectory(prefix="hybrid_infer_upgrade_") as tmp:
        out = Path(tmp) / path.name
        proc = subprocess.run([str(tool), str(path), str(out)], capture_output=True, text=True,
                              env={**os.environ, "GLOG_minloglevel": "0", "GLOG_logtostderr": "1"})
        if proc.returncode != 0 or not out.exists():
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise ModelError(f"{path}: Caffe could not upgrade this old-format file: {last}")
        net = caffe_pb2().NetParameter()
        text_format.Merge(out.read_text(), net)
    return net


def read_prototxt(path: str | os.PathLike[str]) -> NetParameter:
    """Parse a network definition; syntax errors name the file and line."""
    p = _existing_file(path, "prototxt")
    net = caffe_pb2().NetParameter()
    try:
        text_format.Merge(p.read_text(), net)
    except text_format.ParseError as exc:
        line = exc.GetLine() if hasattr(exc, "GetLine") else None
        where = f"{p}:{line}" if line else str(p)
        message = str(exc).split(" : ", 1)[-1]
        raise ModelError(f"{where}: not a valid Caffe prototxt for this Caffe: {message}") from None
    except UnicodeDecodeError:
        raise ModelError(f"{p}: not a text prototxt (is it a .caffemodel?)") from None
    if len(net.layers):
        net = _upgrade_v1(p)
    return net


def _state_meets_rule(state: Any, rule: Any) -> bool:
    """Caffe's NetStateRule semantics (Net::StateMeetsRule)."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def _layer_included(state: Any, layer: LayerParameter) -> bool:
    if layer.include:
        return any(_state_meets_rule(state, r) for r in layer.include)
    return not any(_state_meets_rule(state, r) for r in layer.exclude)


def _input_layers(net: NetParameter, source: str) -> list[LayerParameter]:
    """Turn the legacy ``input:`` + ``input_shape``/``input_dim`` fields into Input layers."""
    names = list(net.input)
    if not names:
        return []
    shapes: list[list[int]]
    if len(net.input_shape):
        shapes = [list(s.dim) for s in net.input_shape]
    elif len(net.input_dim):
        dims = list(net.input_dim)
        if len(dims) != 4 * len(names):
            raise ModelError(f"{source}: {len(names)} input(s) need {4 * len(names)} input_dim "
                             f"values, found {len(dims)}")
        shapes = [dims[4 * i:4 * i + 4] for i in range(len(names))]
    else:
        raise ModelError(f"{source}: inputs {names} have no input_shape or input_dim")
    if len(shapes) != len(names):
        raise ModelError(f"{source}: {len(names)} input(s) but {len(shapes)} input_shape entries")
    layers = []
    for name, dims in zip(names, shapes):
        layer = caffe_pb2().LayerParameter(name=name, type="Input", top=[name])
        layer.input_param.shape.add().dim.extend(dims)
        layers.append(layer)
    return layers


def normalise(net: NetParameter, source: str) -> tuple[NetParameter, dict[str, str]]:
    """Return a copy of ``net`` holding the TEST-phase layers with inputs as Input layers.

    Caffe tolerates two layers of one name (weights then go by name to both); the graph
    needs unique names, so repeats become ``name#2``, ``name#3``. The returned dict maps
    each such new name to the original one.
    """
    pb2 = caffe_pb2()
    state = pb2.NetState()
    state.CopyFrom(net.state)
    state.phase = pb2.TEST
    out = pb2.NetParameter(name=net.name)
    out.layer.extend(_input_layers(net, source))
    for layer in net.layer:
        if layer.include and layer.exclude:
            raise ModelError(f"{source}: layer '{layer.name}' has both include and exclude rules; "
                             "Caffe allows only one of them")
        if _layer_included(state, layer):
            kept = out.layer.add()
            kept.CopyFrom(layer)
            del kept.include[:]
            del kept.exclude[:]
    renamed: dict[str, str] = {}
    seen: set[str] = set()
    for layer in out.layer:
        if layer.name in seen:
            n = 2
            while f"{layer.name}#{n}" in seen:
                n += 1
            renamed[f"{layer.name}#{n}"] = layer.name
            layer.name = f"{layer.name}#{n}"
        seen.add(layer.name)
    return out, renamed


def write_prototxt(net: NetParameter, path: Path) -> None:
    """Write ``net`` as text, atomically (readers never see half a file)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text_format.MessageToString(net))
    tmp.replace(path)
