"""User-facing errors.

Every problem a user can fix (bad file, unknown layer, wrong input) is raised as a
``HybridInferError`` whose message names the file, layer or blob and says what to do;
the CLI prints it on one line and exits with code 2. Anything else is a bug in
hybrid_infer and keeps its traceback.
"""
from __future__ import annotations

from typing import Sequence


class HybridInferError(Exception):
    """A problem with the user's model, inputs or options, explained in the message."""


class ModelError(HybridInferError):
    """The prototxt or caffemodel cannot be used as given."""


class InputError(HybridInferError):
    """An input tensor or input file does not fit the model."""


class OptionError(HybridInferError):
    """An option (profile, fallback name, partition spec, path) is not valid."""


class EnvironmentProblem(HybridInferError):
    """Something hybrid_infer needs is not installed or not usable on this machine."""


class EngineRejected(HybridInferError):
    """An engine refused a segment; the executor runs that segment in Caffe instead.

    ``caffe_layers`` names the Caffe layers the refusal is about (from the failing ONNX
    nodes' names or doc_string), so the partitioner can move exactly those to Caffe; it is
    empty when the refusal is not tied to layers (workspace, a missing provider).
    ``engines`` names the engines that refused, where more than one was tried (``auto``).
    """

    def __init__(self, message: str, caffe_layers: Sequence[str] = (), engines: Sequence[str] = ()):
        super().__init__(message)
        self.caffe_layers = list(caffe_layers)
        self.engines = list(engines)


class LoweringError(HybridInferError):
    """A layer cannot be lowered to ONNX (no lowering, parameters ONNX cannot express, a
    lowering that failed).

    ``layer`` is the Caffe layer's name, so callers can point at it or run it in Caffe;
    ``layers`` lists every refused layer when one segment had several (see ``combine``).
    """

    def __init__(self, layer: str, layer_type: str, reason: str):
        super().__init__(f"layer '{layer}' ({layer_type}): {reason}")
        self.layer = layer
        self.layer_type = layer_type
        self.reason = reason
        self.layers = [layer]

    @classmethod
    def combine(cls, failures: Sequence["LoweringError"]) -> "LoweringError":
        """One error for all layers of a segment that could not be lowered."""
        if len(failures) == 1:
            return failures[0]
        first = failures[0]
        combined = cls(first.layer, first.layer_type, first.reason)
        combined.args = ("; ".join(str(f) for f in failures),)
        combined.layers = [f.layer for f in failures]
        return combined


class EngineBuildError(EngineRejected):
    """TensorRT could not build a segment's engine (``caffe_layers``: the layers its ONNX
    parser rejected, when it named any)."""


class CalibrationError(HybridInferError):
    """A calibration file cannot be used: unreadable, or stale (made for another model,
    weights or partition); the message says to run ``hybrid-infer calibrate`` again."""
