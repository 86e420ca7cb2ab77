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
    """An engine refused a segment; the executor runs that segment in Caffe instead."""


class LoweringError(HybridInferError):
    """A layer cannot be lowered to ONNX (no lowering, or parameters ONNX cannot express).

    ``layer`` is the Caffe layer's name, so callers can point at it or run it in Caffe.
    """

    def __init__(self, layer: str, layer_type: str, reason: str):
        super().__init__(f"layer '{layer}' ({layer_type}): {reason}")
        self.layer = layer
        self.layer_type = layer_type


class EngineBuildError(EngineRejected):
    """TensorRT (or OpenVINO) could not build a segment's engine.

    ``caffe_layers`` names the Caffe layers the engine's ONNX reader rejected (taken from the
    failing ONNX nodes' doc_string), so the partitioner can move exactly those to Caffe;
    it is empty when the failure is not tied to layers (workspace, builder errors).
    """

    def __init__(self, message: str, caffe_layers: Sequence[str] = ()):
        super().__init__(message)
        self.caffe_layers = list(caffe_layers)
