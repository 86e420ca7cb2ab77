"""ONNX Runtime runs a TensorRT segment's ONNX: on the CPU here, or through ORT's
CUDA/TensorRT execution providers where they are installed."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from ..errors import EngineRejected


def _providers(device: str) -> list[str]:
    """ORT's GPU providers where this ORT build has them (unless told "cpu"), then the CPU."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    order = [] if device == "cpu" else ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    return [p for p in order if p in available] + ["CPUExecutionProvider"]


class OnnxRuntimeEngine:
    """One ORT session per segment, created once and reused for every run.

    ``idle_spin=False`` makes the session's worker threads stop busy-waiting when a run ends
    (they still spin between the operators of a run, where it saves a wake-up per operator).
    Spinning on after a run helps when the same session runs again at once, but when another
    engine runs next (a Caffe segment, or another segment's session with its own threads) the
    spinning threads take its cores: on 2 cores GoogLeNet with one Python layer in the middle
    took 34 ms instead of 20 ms, and turning spinning off altogether instead cost SqueezeNet's
    split version 6.6 ms instead of 4.1 ms.
    """

    kind = "onnxruntime"

    def __init__(self, model: onnx.ModelProto, *, threads: int = 0, device: str = "auto",
                 idle_spin: bool = True):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if not idle_spin:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=_providers(device))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            from ..lowering.segment_to_onnx import layers_named_in
            raise EngineRejected(f"ONNX Runtime rejected the segment: {str(exc).splitlines()[0]}",
                                 layers_named_in(str(exc), model)) from exc
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self.output_names, {name: feeds[name] for name in self.input_names})
        return dict(zip(self.output_names, results))

    def close(self) -> None:
        self._session = None
