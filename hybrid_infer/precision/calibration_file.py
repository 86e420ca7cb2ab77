"""The calibration file: what ``hybrid-infer calibrate`` measured, kept by the user.

A JSON document holding, for one model, weights and partition:

- ``precision`` ("int8" or "fp16") and, for INT8, the calibration ``method``;
- per TensorRT segment, the SHA-256 of the segment's FP32 ONNX (as the lowering writes it;
  also without its output list, so asking for other output blobs is not staleness) and the range ``[lowest, highest]`` of every float tensor of its prepared graph, in the
  units of the tensor (as ONNX Runtime's calibrators report them);
- the identity of the model: SHA-256 of the normalised prototxt (input shapes included) and
  of the weights as loaded, so a changed prototxt or caffemodel is named in the refusal;
- the partition options it was made with, the digest and count of the calibration inputs,
  the layers kept in FP32 (``--keep-fp32`` and the automatic search) and that search's report.

A file is refused (``CalibrationError``) when it is unreadable, of another format, or stale:
made for another prototxt, other weights, or segments whose ONNX differ. Scales are not
stored: they follow from the ranges and the target (symmetric INT8 for TensorRT, as its
explicit quantization requires; see ``qdq.py``), so one file serves every engine.
Written atomically (temporary file, then rename), like the engine cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..errors import CalibrationError
from ..files import read_regular_file, write_atomically

FORMAT = "hybrid_infer calibration"
VERSION = 1
PRECISIONS = ("int8", "fp16")
METHODS = ("entropy", "percentile", "minmax")


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
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    path: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CalibrationError(f"{self._where()}precision '{self.precision}' is not one of "
                                   f"{', '.join(PRECISIONS)}")
        if self.precision == "int8" and self.method not in METHODS:
            raise CalibrationError(f"{self._where()}INT8 calibration method '{self.method}' is not one of "
                                   f"{', '.join(METHODS)}")

    def _where(self) -> str:
        return f"{self.path}: " if self.path else ""

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
        """Write atomically: readers see the previous file or this whole one."""
        path = Path(path)
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        text = json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text.encode(), option="calibration file")
        self.path = path
        return path


def load_calibration(path: os.PathLike[str] | str) -> Calibration:
    """Read a calibration file; raises ``CalibrationError`` naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration file '{path}' does not exist; make one with "
                               "hybrid-infer calibrate")
    try:
        data = json.loads(read_regular_file(path, "calibration file", CalibrationError))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable calibration file ({exc.__class__.__name__}: "
                               f"{exc}); run hybrid-infer calibrate again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"{path}: not a hybrid_infer calibration file; make one with "
                               "hybrid-infer calibrate")
    if data.get("version") != VERSION:
        raise CalibrationError(f"{path}: calibration format version {data.get('version')} is not "
                               f"{VERSION} (written by another hybrid_infer); run hybrid-infer calibrate again")
    try:
        segments = [SegmentCalibration(int(s["segment_id"]), list(s["layers"]), str(s["onnx_sha256"]),
                                       {str(k): [float(v[0]), float(v[1])] for k, v in s["ranges"].items()},
                                       str(s.get("body_sha256", "")))
                    for s in data["segments"]]
        calibration = Calibration(
            precision=str(data["precision"]), method=data.get("method"), model=dict(data["model"]),
            partition=dict(data["partition"]), inputs=dict(data["inputs"]), segments=segments,
            keep_fp32=list(data.get("keep_fp32", [])), sensitivity=data.get("sensitivity"),
            tools=dict(data.get("tools", {})), created=str(data.get("created", "")), path=path)
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CalibrationError(f"{path}: damaged calibration file ({exc.__class__.__name__}: {exc}); "
                               "run hybrid-infer calibrate again") from None
    return calibration


def model_identity(net_parameter_bytes: bytes, weights: Mapping[str, Sequence[np.ndarray]]) -> dict[str, str]:
    """Digests of the normalised prototxt and of the weights as loaded (file or random)."""
    return {"prototxt_sha256": sha256_bytes(net_parameter_bytes),
            "weights_sha256": arrays_digest(a for name in sorted(weights) for a in weights[name])}


def check_model(calibration: Calibration, identity: Mapping[str, str], model_name: str) -> None:
    """Refuse a calibration made for another prototxt or other weights."""
    rerun = "run hybrid-infer calibrate again for this model"
    if calibration.model.get("prototxt_sha256") != identity["prototxt_sha256"]:
        raise CalibrationError(
            f"{calibration.path} is stale: it was calibrated for a different prototxt "
            f"({calibration.model.get('prototxt', '?')}) than {model_name} (or other --input-shape); {rerun}")
    if calibration.model.get("weights_sha256") != identity["weights_sha256"]:
        raise CalibrationError(
            f"{calibration.path} is stale: the weights differ from those it was calibrated with "
            f"({calibration.model.get('weights') or 'random weights'}); {rerun}")
