"""INT8 and FP16 rows for scripts/bench.py: the hybrid in each precision on this CPU.

The TensorRT segments run in ONNX Runtime from the ONNX a calibration file produces
(``hybrid_infer.precision``): FP32 as lowered, INT8 as Q/DQ (the CPU placement, U8S8),
FP16 as converted by ONNX Runtime's float16 tool. Calibration (min/max, on the benchmark's
own random inputs: the weights are random too, so only speed is meaningful) is not timed.
Errors are against pure Caffe FP32 on the logits. Also reports the CPU's integer and
reduced-precision features, which decide whether ONNX Runtime has fast kernels for them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from hybrid_infer.api import HybridNet
from hybrid_infer.metrics import compare_outputs
from hybrid_infer.model.caffe_model import CaffeModel
from hybrid_infer.precision.calibrate import batches_of, calibrate

#: /proc/cpuinfo flags that matter for 8- and 16-bit inference on x86.
CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16", "avx512_fp16")
VARIANTS = ("FP32", "FP16", "INT8")
#: Calls of bench.py's ``timed_blocks`` per case; each variant keeps its best block.
ROUNDS = 3


def cpu_features() -> dict[str, bool]:
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = []
    return {flag: flag in flags for flag in CPU_FLAGS}


def measure(prototxt: Path, batch: int, input_shape: tuple[int, ...], seed: int, workdir: Path,
            timed_blocks: Callable[[dict[str, Callable[[], Any]], int, int], dict[str, Any]],
            runs: int, warmup: int) -> dict[str, Any]:
    """Median ms, relative L2 and top-1 agreement against Caffe FP32 for each precision."""
    model = CaffeModel(prototxt, input_shapes={"data": input_shape})
    model.set_random_weights(seed)
    blobs = HybridNet(model, engine="onnxruntime").outputs_with_logits()
    fp32 = HybridNet(model, engine="onnxruntime", outputs=blobs)
    rng = np.random.default_rng(1)
    inputs = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in fp32.input_shapes().items()}
    reference = fp32.run_caffe(inputs)
    nets = {"FP32": fp32}
    for precision, label in (("fp16", "FP16"), ("int8", "INT8")):
        calibration = calibrate(fp32, batches_of(inputs, batch), precision=precision, method="minmax")
        path = calibration.save(workdir / f"{prototxt.parent.name}_{precision}_{batch}.calib.json")
        nets[label] = HybridNet(model, engine="onnxruntime", outputs=blobs, calibration=path)
    rows: dict[str, Any] = {}
    for label, net in nets.items():
        accuracy = compare_outputs(net.run(inputs), reference)
        top1 = [a.top1_agreement for a in accuracy if a.top1_agreement is not None]
        rows[label] = {"rel_l2": max(a.rel_l2 for a in accuracy), "top1": min(top1) if top1 else None}
    calls = {label: (lambda n=net: n.run(inputs)) for label, net in nets.items()}
    timings: dict[str, Any] = {}
    for _ in range(ROUNDS):  # more blocks than the main table: on a shared machine the ratio needs them
        for label, timing in timed_blocks(calls, runs, warmup).items():
            if label not in timings or timing.median < timings[label].median:
                timings[label] = timing
    for label, timing in timings.items():
        rows[label]["median_ms"] = timing.median * 1e3
        rows[label]["vs_fp32"] = timings["FP32"].median / timing.median
    for net in nets.values():
        net.close()
    return rows


def markdown(results: dict[str, dict[str, Any]], features: dict[str, bool]) -> list[str]:
    have = ", ".join(f for f, on in features.items() if on) or "none of them"
    lines = ["", f"Reduced precision on this CPU (ONNX Runtime runs the TensorRT segments; INT8: Q/DQ with U8S8, "
                 f"FP16: ONNX Runtime's float16 conversion; best of {2 * ROUNDS} blocks). CPU features among {', '.join(CPU_FLAGS)}: {have}. "
                 "Error against pure Caffe FP32 on the logits (random weights and inputs: speed is the point).", "",
             "| model | batch | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | INT8 vs FP32 | FP16 vs FP32 | "
             "INT8 rel L2 / top-1 | FP16 rel L2 |", "|---|---|" + "---|" * (len(VARIANTS) + 4)]
    for case, rows in results.items():
        model, batch = case.rsplit(" b", 1)
        int8, fp16 = rows["INT8"], rows["FP16"]
        top1 = f"{int8['top1']:.0%}" if int8["top1"] is not None else "-"
        lines.append(f"| {model} | {batch} | " + " | ".join(f"{rows[v]['median_ms']:.1f}" for v in VARIANTS)
                     + f" | {int8['vs_fp32']:.2f}x | {fp16['vs_fp32']:.2f}x | {int8['rel_l2']:.3g} / {top1} | "
                       f"{fp16['rel_l2']:.2g} |")
    for case, rows in results.items():
        if case.startswith("resnet50 b8"):
            ratio = rows["INT8"]["vs_fp32"]
            lines += ["", f"Target: INT8 ResNet-50 at batch 8 at least 2x the FP32 hybrid on a CPU with VNNI or AMX: "
                          f"{ratio:.2f}x, {'met' if ratio >= 2 else '**not met**'}."]
    return lines
