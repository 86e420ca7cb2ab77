"""INT8 and FP16 rows for scripts/bench.py: the hybrid in each precision on this CPU.

The TensorRT segments run in ONNX Runtime from the ONNX a calibration file produces
(``hybrid_infer.precision``): FP32 as lowered, INT8 as Q/DQ (the CPU placement, U8S8),
FP16 as converted by ONNX Runtime's float16 tool. Calibration (min/max, on the benchmark's
own random inputs: the weights are random too, so only speed is meaningful) is not timed.
Errors are against pure Caffe FP32 on the logits. Also reports the CPU's integer and
reduced-precision features, which decide whether ONNX Runtime has fast kernels for them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hybrid_infer.analysis.timing import Timing
from hybrid_infer.api import HybridNet
from hybrid_infer.metrics import compare_outputs
from hybrid_infer.model.caffe_model import CaffeModel
from hybrid_infer.precision.calibrate import batches_of, calibrate

#: /proc/cpuinfo flags that matter for 8- and 16-bit inference on x86.
CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16", "avx512_fp16")
VARIANTS = ("FP32", "FP16", "INT8")
#: Pause before each timed call: ONNX Runtime's worker threads stop spinning meanwhile, so a
#: call does not pay for the previous variant's threads.
PAUSE_S = 0.2


def interleaved(calls: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, Timing]:
    """Median of ``runs`` calls per variant, the variants taking turns call by call (after
    ``warmup`` untimed calls each). On a machine shared with other jobs, load comes and goes
    over minutes; taking turns exposes every variant to the same load, so their ratio holds
    where one block per variant (bench.py's main table) can catch a quiet minute for one
    variant and a busy one for the next (ResNet-50 INT8 over FP32 measured 8.2x and 2.0x in
    two such runs)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(runs):
        for label, call in calls.items():
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            call()
            samples[label].append(time.perf_counter() - start)
    return {label: Timing(tuple(s)) for label, s in samples.items()}


def cpu_features() -> dict[str, bool]:
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = []
    return {flag: flag in flags for flag in CPU_FLAGS}


def measure(prototxt: Path, batch: int, input_shape: tuple[int, ...], seed: int, workdir: Path,
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
    timings = interleaved({label: (lambda n=net: n.run(inputs)) for label, net in nets.items()}, runs, warmup)
    for label, timing in timings.items():
        rows[label]["median_ms"] = timing.median * 1e3
        rows[label]["vs_fp32"] = timings["FP32"].median / timing.median
    for net in nets.values():
        net.close()
    return rows


def markdown(results: dict[str, dict[str, Any]], features: dict[str, bool]) -> list[str]:
    have = ", ".join(f for f, on in features.items() if on) or "none of them"
    lines = ["", f"Reduced precision on this CPU (ONNX Runtime runs the TensorRT segments; INT8: Q/DQ with U8S8, "
                 f"FP16: ONNX Runtime's float16 conversion; variants timed in turns, median). CPU features among {', '.join(CPU_FLAGS)}: {have}. "
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


def main() -> int:
    """The precision rows alone: ``.venv/bin/python scripts/bench_precision.py [--models ...]``."""
    import argparse
    import json
    import os
    import sys
    import tempfile
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("GLOG_minloglevel", "2")
    from bench import MODELS, REPO, SHARED, _input_shape
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "googlenet"], choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=REPO / "results")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="hybrid_precision_bench_") as tmp:
        for name in args.models:
            for batch in args.batches:
                prototxt = SHARED / MODELS[name]
                print(f"{name} b{batch} ...", file=sys.stderr, flush=True)
                results[f"{name} b{batch}"] = measure(prototxt, batch, _input_shape(prototxt, batch), args.seed,
                                                      Path(tmp), args.runs, args.warmup)
    features = cpu_features()
    text = "\n".join(markdown(results, features)).lstrip() + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_precision.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "cpu_features": features, "runs": args.runs, "cases": results},
        indent=2) + "\n")
    (args.out / "bench_precision.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
