"""Lowering of TensorRT segments to ONNX, the interchange TensorRT and ONNX Runtime share."""
