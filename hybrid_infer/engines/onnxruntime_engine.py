"""ONNX Runtime runs a TensorRT segment's ONNX on the CPU.

Only the CPU provider, also where onnxruntime-gpu is installed: ORT's CUDA provider is the
``onnxruntime-cuda`` engine (``onnxruntime_cuda_engine.py``), which binds device memory
for the hand-offs and turns TF32 off; left to its defaults here it would compute
convolutions in TF32, about 1e-4 from Caffe (measured on an H200)."""
from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np
import onnx

from ..errors import EngineRejected, InputError


#: Where ORT's run-time errors name the failing node.
_FAILED_NODE = re.compile(r"Name:'([^']*)'")
#: How ORT's run-time errors say an allocation failed.
_OUT_OF_MEMORY = re.compile(r"Failed to allocate memory|bad_alloc|bad allocation|out of memory", re.IGNORECASE)


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

    def __init__(self, model: onnx.ModelProto, *, threads: int = 0, idle_spin: bool = True,
                 value_checked: Optional[Mapping[str, str]] = None):
        """``value_checked`` maps Caffe layers whose ONNX fails at run time on bad input
        *values* (Embed's Gather on an index out of range) to what they take: such a failure
        is raised as a one-line InputError naming the layer rather than ORT's own error."""
        import onnxruntime as ort
        self._value_checked = dict(value_checked or {})
        #: Nodes of those layers (each node carries its Caffe layer's name in doc_string).
        self._layer_of_node = {node.name: node.doc_string for node in model.graph.node
                               if node.doc_string in self._value_checked}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 4  # fatal only: a failure is reported once, by run()
        if not idle_spin:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            from ..lowering.segment_to_onnx import layers_named_in
            raise EngineRejected(f"ONNX Runtime rejected the segment: {str(exc).splitlines()[0]}",
                                 layers_named_in(str(exc), model)) from exc
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        #: ONNX node name -> the Caffe layer it was lowered from (the lowering's doc_string).
        self._layers = {node.name: node.doc_string for node in model.graph.node if node.doc_string}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session. A failure at run time (ONNX Runtime checks some shapes only then)
        is an ``InputError`` for value-checked layers and for a failed allocation (Caffe would
        need the memory too), else an ``EngineRejected`` naming the Caffe layer whose node
        failed and the --fallback that runs it in Caffe."""
        try:
            results = self._session.run(self.output_names, {name: feeds[name] for name in self.input_names})
        except Exception as exc:  # ORT raises its own InvalidArgument/Fail/RuntimeException types
            self._raise_value_error(str(exc))
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            node = _FAILED_NODE.search(message)
            layer = self._layer_of(node.group(1)) if node else None
            if _OUT_OF_MEMORY.search(str(exc)):  # running it in Caffe would not help
                raise InputError(f"ONNX Runtime ran out of memory{f' in layer {layer!r}' if layer else ''} "
                                 f"({message}); use a smaller batch or input size, or a machine with more "
                                 "memory") from None
            advice = (f"; run that layer in Caffe instead with --fallback {layer}" if layer
                      else "; run the segment's layers in Caffe with --fallback")
            raise EngineRejected(f"ONNX Runtime failed running{f' layer {layer!r}' if layer else ''}: "
                                 f"{message}{advice}", [layer] if layer else []) from None
        return dict(zip(self.output_names, results))

    def _layer_of(self, node: str) -> Optional[str]:
        """The Caffe layer of an ONNX node; ORT's optimizer renames nodes it rewrites by adding
        to the name ("tall" -> "tall_nchwc"), so the longest layer name it starts with."""
        if node in self._layers:
            return self._layers[node]
        starts = [layer for layer in set(self._layers.values()) if node.startswith(layer)]
        return max(starts, key=len) if starts else None

    def _raise_value_error(self, message: str) -> None:
        """Raise InputError if ORT's error ``message`` comes from a node of a value-checked layer."""
        found = _FAILED_NODE.search(message)
        node = found.group(1) if found else ""
        if node in self._layer_of_node:
            raise InputError(f"{self._value_checked[self._layer_of_node[node]]}, and got one outside that "
                             f"in this run (ONNX Runtime stopped at its node {node})") from None

    def close(self) -> None:
        self._session = None
