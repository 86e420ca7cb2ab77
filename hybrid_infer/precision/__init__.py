"""Reduced precision for the TensorRT segments: INT8 calibrated on the user's inputs, FP16,
and layers kept in FP32.

``calibrate`` runs the FP32 hybrid on calibration inputs and records the ranges of every
TensorRT segment's tensors (``ranges.py``, ONNX Runtime's calibrators) in a calibration file
(``calibration_file.py``); ``plan.py`` applies that file to each segment when engines are
built, producing Q/DQ ONNX (``qdq.py``, ONNX Runtime's quantizer) for TensorRT or for ONNX
Runtime on the CPU; ``sensitivity.py`` finds the layers to keep in FP32 for an accuracy target.
"""
