"""The calibration file: what ``hybrid-infer calibrate`` measured, kept by the user.

A JSON document holding, for one model, weights and partition:

- ``precision`` ("int8" or "fp16") and, for INT8, the calibration ``method``;
- per TensorRT segment, the SHA-256 of the segment's FP32 ONNX (as the lowering writes it,
  without the graph's name, which carries the segment's number; also without its output
  list, so asking for other output blobs is not staleness) and the range
  ``[lowest, highest]`` of every float tensor of its prepared graph, in the units of the
  tensor (as ONNX Runtime's calibrators report them, widened to contain 0: INT8 must
  represent zero exactly, and ONNX Runtime's quantizer widens them so anyway);
- the identity of the model: SHA-256 of the normalised prototxt (input shapes included) and
  of the weights as loaded, and the input shapes, so a changed prototxt, caffemodel or
  ``--input-shape`` is named in the refusal;
- the partition options it was made with, the digest and count of the calibration inputs
  and the image preprocessing they had, the layers kept in FP32 (``--keep-fp32`` and the
  automatic search), that search's report, and the error against Caffe FP32 that
  ``calibrate`` measured (``accuracy``).

A file is refused (``CalibrationError``, naming the file and the field or tensor) when it is
unreadable, larger than ``MAX_FILE_BYTES``, of another format, holds a range that no
calibration produces (not two finite numbers, not containing 0, beyond ``RANGE_LIMITS``), or
is stale: made for another prototxt, other weights, or segments whose ONNX differ. Scales
are not stored: they follow from the ranges and the target (symmetric INT8 for TensorRT, as
its explicit quantization requires; see ``qdq.py``), so one file serves every engine.
Written atomically (temporary file, then rename), like the engine cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..errors import CalibrationError, OptionError
from ..files import read_regular_file, write_atomically

FORMAT = "hybrid_infer calibration"
#: 2: ranges contain 0, segment digests without the graph name, input shapes and accuracy stored.
VERSION = 2
PRECISIONS = ("int8", "fp16")
METHODS = ("entropy", "percentile", "minmax")
#: Larger files are refused unread: a ResNet-50 file is about 40 KiB, one range per tensor.
MAX_FILE_BYTES = 64 << 20
#: A nonzero range bound must lie within these magnitudes. An INT8 scale is the bound / 127
#: (or / 255); multiplied by a weight scale (~1e-3) it must stay a normal FP32 number, and no
#: activation of a working FP32 net comes near 1e20. A bound of exactly 0 is an all-zero tensor.
RANGE_LIMITS = (1e-20, 1e20)
RERUN = "run hybrid-infer calibrate again"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_digest(arrays: Iterable[np.ndarray]) -> str:
    """SHA-256 over arrays' shapes, dtypes and bytes, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def range_problem(value: object) -> Optional[str]:
    """Why ``value`` is not a range calibration could have written ([lowest, highest], finite,
    containing 0, nonzero bounds within ``RANGE_LIMITS``), or None."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return f"{value!r} is not a pair [lowest, highest]"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return f"{value!r} is not a pair of numbers"
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"[{lo:g}, {hi:g}] is not finite"
    if lo > hi:
        return f"[{lo:g}, {hi:g}] has its lowest above its highest"
    if lo > 0 or hi < 0:
        return f"[{lo:g}, {hi:g}] does not contain 0 (calibration ranges do: INT8 represents zero exactly)"
    small, large = RANGE_LIMITS
    bound = max(-lo, hi)
    if bound > large or 0 < bound < small:
        return (f"[{lo:g}, {hi:g}] reaches {bound:g}, outside the magnitudes {small:g} .. {large:g} that an "
                "FP32 activation quantized to 8 bits can have")
    return None


def widened(lo: float, hi: float) -> list[float]:
    """A calibrator's (lowest, highest) as stored: widened to contain 0."""
    return [min(float(lo), 0.0), max(float(hi), 0.0)]


@dataclass
class SegmentCalibration:
    """One TensorRT segment: which ONNX it belongs to and the ranges of its tensors."""
    segment_id: int
    layers: list[str]
    onnx_sha256: str
    #: Tensor name in the prepared graph -> [lowest, highest] seen (after the method's clipping).
    ranges: dict[str, list[float]] = field(default_factory=dict)
    #: SHA-256 of the same ONNX without its list of outputs: the segment asked for other
    #: output blobs (``--output-blob``, ``run --check``'s logits) computes the same tensors.
    body_sha256: str = ""


@dataclass
class Calibration:
    """The whole file; ``path`` is where it was read from or written to."""
    precision: str
    method: Optional[str]
    model: dict[str, Any]
    partition: dict[str, Any]
    inputs: dict[str, Any]
    segments: list[SegmentCalibration]
    keep_fp32: list[str] = field(default_factory=list)
    sensitivity: Optional[dict[str, Any]] = None
    #: What ``calibrate`` measured against Caffe FP32: rel_l2, top1, detections, inputs, engine.
    accuracy: Optional[dict[str, Any]] = None
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    path: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CalibrationError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.precision == "int8" and self.method not in METHODS:
            raise CalibrationError(f"INT8 calibration method '{self.method}' is not one of {', '.join(METHODS)}")
        if not isinstance(self.keep_fp32, list) or not all(isinstance(n, str) for n in self.keep_fp32):
            raise CalibrationError(f"keep_fp32 must be a list of layer names or types, not {self.keep_fp32!r}")
        for segment in self.segments:
            for name, value in segment.ranges.items():
                problem = range_problem(value)
                if problem:
                    raise CalibrationError(f"segment {segment.segment_id}: the range of tensor '{name}' "
                                           f"{problem}")

    @property
    def label(self) -> str:
        """"INT8 entropy", "FP16": how reports name this precision."""
        return self.precision.upper() + (f" {self.method}" if self.precision == "int8" else "")

    def segment_for(self, onnx_sha256: str, body_sha256: str = "") -> Optional[SegmentCalibration]:
        """The segment calibrated for exactly this ONNX, else for the same ONNX with other outputs."""
        exact = next((s for s in self.segments if s.onnx_sha256 == onnx_sha256), None)
        return exact or next((s for s in self.segments if body_sha256 and s.body_sha256 == body_sha256), None)

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT, "version": VERSION, **asdict(self)}
        del data["path"]
        return data

    def save(self, path: Path) -> Path:
        """Write atomically: readers see the previous file or this whole one. The folder must
        exist (``files.write_atomically`` creates none); OptionError otherwise."""
        path = Path(path)
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        text = json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n"
        write_atomically(path, text.encode(), option="calibration file")
        self.path = path
        return path


#: How JSON names Python's types, in messages.
_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true/false", type(None): "null"}


def _typed(data: Mapping[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    """``data[key]`` if it is a ``kind`` (or absent with a default); CalibrationError otherwise."""
    if key not in data and default is not ...:
        return default
    if key not in data:
        raise CalibrationError(f"'{key}' is missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CalibrationError(f"'{key}' must be {_JSON_KINDS.get(kind, kind.__name__)}, not "
                               f"{_JSON_KINDS.get(type(value), type(value).__name__)} {value!r:.60}")
    return value


def _segment(data: object, index: int) -> SegmentCalibration:
    if not isinstance(data, dict):
        raise CalibrationError(f"segments[{index}] must be an object, not {type(data).__name__}")
    ranges = _typed(data, "ranges", dict)
    layers = _typed(data, "layers", list)
    if not all(isinstance(name, str) for name in layers):
        raise CalibrationError(f"segments[{index}].layers must be layer names")
    segment_id = _typed(data, "segment_id", int)
    for name, value in ranges.items():
        problem = range_problem(value)
        if problem:
            raise CalibrationError(f"segment {segment_id}: the range of tensor '{name}' {problem}")
    return SegmentCalibration(segment_id, list(layers), _typed(data, "onnx_sha256", str),
                              {str(k): [float(v[0]), float(v[1])] for k, v in ranges.items()},
                              _typed(data, "body_sha256", str, ""))


def load_calibration(path: os.PathLike[str] | str) -> Calibration:
    """Read a calibration file; raises ``CalibrationError`` naming the file and the problem
    (one line, saying to re-run ``hybrid-infer calibrate``)."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration file '{path}' does not exist; make one with hybrid-infer calibrate")
    raw = read_regular_file(path, "calibration file", CalibrationError, max_bytes=MAX_FILE_BYTES)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CalibrationError(f"{path}: not a readable calibration file ({exc.__class__.__name__}: "
                               f"{str(exc)[:120]}); {RERUN}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"{path}: not a hybrid_infer calibration file; make one with hybrid-infer calibrate")
    if data.get("version") != VERSION:
        raise CalibrationError(f"{path}: calibration format version {data.get('version')!r:.20} is not {VERSION} "
                               f"(written by another hybrid_infer); {RERUN}")
    try:
        segments = [_segment(s, i) for i, s in enumerate(_typed(data, "segments", list))]
        method = data.get("method")
        if method is not None and not isinstance(method, str):
            raise CalibrationError(f"'method' must be a string or null, not {method!r:.40}")
        sensitivity = data.get("sensitivity")
        accuracy = data.get("accuracy")
        for key, value in (("sensitivity", sensitivity), ("accuracy", accuracy)):
            if value is not None and not isinstance(value, dict):
                raise CalibrationError(f"'{key}' must be an object or null, not {type(value).__name__}")
        return Calibration(
            precision=_typed(data, "precision", str), method=method, model=_typed(data, "model", dict),
            partition=_typed(data, "partition", dict), inputs=_typed(data, "inputs", dict), segments=segments,
            keep_fp32=_typed(data, "keep_fp32", list, []), sensitivity=sensitivity, accuracy=accuracy,
            tools=_typed(data, "tools", dict, {}), created=str(data.get("created", "")), path=path)
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}; {RERUN}") from None


def model_identity(net: Any, weights: Mapping[str, Sequence[np.ndarray]],
                   input_shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Digests of the normalised prototxt (``net``, a NetParameter) with every input's batch
    set to 1, and of the weights as loaded (file or random), and the input shapes (blob ->
    dims, batch 1) the prototxt has after ``--input-shape``. The batch is left out because
    ranges do not depend on it: a calibration made at batch 1 serves ``--input-shape``
    data=8x... (the calibration inputs decide the ranges, not the batch they came in)."""
    unbatched = type(net)()
    unbatched.CopyFrom(net)
    for shape in unbatched.input_shape:
        if len(shape.dim):
            shape.dim[0] = 1
    for i in range(0, len(unbatched.input_dim), 4):
        unbatched.input_dim[i] = 1
    for layer in unbatched.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                if len(shape.dim):
                    shape.dim[0] = 1
    return {"prototxt_sha256": sha256_bytes(unbatched.SerializeToString(deterministic=True)),
            "weights_sha256": arrays_digest(a for name in sorted(weights) for a in weights[name]),
            "input_shapes": {name: [1, *(int(d) for d in shape[1:])] for name, shape in input_shapes.items()}}


def _shapes_text(shapes: Mapping[str, Sequence[int]]) -> str:
    return " ".join(f"{name}={'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def check_model(calibration: Calibration, identity: Mapping[str, Any], model_name: str) -> None:
    """Refuse a calibration made for another prototxt, other input shapes or other weights."""
    rerun = f"{RERUN} for this model"
    if calibration.model.get("prototxt_sha256") != identity["prototxt_sha256"]:
        stored = calibration.model.get("input_shapes")
        if isinstance(stored, dict) and stored != identity["input_shapes"]:
            raise CalibrationError(
                f"{calibration.path} is stale: it was calibrated for input shape {_shapes_text(stored)}, and "
                f"{model_name} now has {_shapes_text(identity['input_shapes'])} (--input-shape); calibrate with "
                f"--input-shape {_shapes_text(identity['input_shapes'])}, or run with --input-shape "
                f"{_shapes_text(stored)}")
        raise CalibrationError(
            f"{calibration.path} is stale: it was calibrated for a different prototxt "
            f"({calibration.model.get('prototxt', '?')}) than {model_name}; {rerun}")
    if calibration.model.get("weights_sha256") != identity["weights_sha256"]:
        raise CalibrationError(
            f"{calibration.path} is stale: the weights differ from those it was calibrated with "
            f"({calibration.model.get('weights') or 'random weights'}); {rerun}")


def as_layer_list(value: object, what: str) -> list[str]:
    """``keep_fp32`` and similar: a list (or tuple, set) of layer names or types; a single
    string is refused rather than read letter by letter. OptionError naming ``what``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise OptionError(f"{what} must be a list of layer names or types, not {type(value).__name__} {value!r:.60}")
    if not all(isinstance(item, str) for item in value):
        raise OptionError(f"{what} must hold layer names or types (strings)")
    return list(value)
