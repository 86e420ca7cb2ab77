#!/usr/bin/env python
"""What reduced precision costs in accuracy, on models with real weights and real inputs.

Every figure compares the hybrid in FP32 and in a calibrated precision (INT8 by method,
FP16), the TensorRT segments run by ONNX Runtime on this CPU from the same Q/DQ (or FP16)
ONNX TensorRT would build (``hybrid_infer.precision``):

- LeNet (graphs/lenet_digits, trained): calibrated on scikit-learn's digits *training* split
  (as scripts/train_lenet_digits.py prepares it), accuracy on the *test* split.
- hyperlpr_mininet_ssd (../shared/models, trained SSD): calibrated on its sample photo, as
  HyperLPR preprocesses it; the plates detected (score >= 0.5) and how far each box moved, in
  pixels. PriorBox and DetectionOutput are lowered into the same segment and stay float.
- FSRCNN (../shared/models/fsrcnn, trained): calibrated on the low-resolution Y channel of its
  two Set5 images (bicubic downscale by 3, an 85 x 85 crop of each so that one input shape
  serves both), PSNR of the x3 output against the ground truth (Y, 4-pixel border shaved).

Writes results/precision.json and results/precision.md. Takes a few minutes on 2 cores.

    .venv/bin/python scripts/precision_accuracy.py [--methods entropy minmax percentile] [--out results]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402

import hybrid_infer  # noqa: E402
from hybrid_infer.inputs import Preprocessing, load_input  # noqa: E402
from hybrid_infer.detections import compare_detections, detection_outputs  # noqa: E402
from hybrid_infer.precision.calibrate import batches_of, calibrate  # noqa: E402


def variants(methods: list[str]) -> list[tuple[str, str]]:
    return [("int8", m) for m in methods] + [("fp16", "minmax")]


def calibrated(load, inputs: dict[str, np.ndarray], precision: str, method: str, workdir: Path,
               batch: int = 16) -> Path:
    """Calibrate a fresh FP32 hybrid from ``load()`` and write the file as a user would keep it."""
    with load() as net:
        calibration = calibrate(net, batches_of(inputs, batch), precision=precision, method=method)
    return calibration.save(workdir / f"{precision}_{method}_{time.monotonic_ns()}.calib.json")


def label(precision: str, method: str) -> str:
    return "INT8 " + method if precision == "int8" else precision.upper()


def lenet(methods: list[str], workdir: Path) -> dict[str, Any]:
    from train_lenet_digits import load_data
    x_train, _, x_test, y_test, _ = load_data()
    folder = REPO / "graphs" / "lenet_digits"
    load = lambda calibration=None: hybrid_infer.load(folder / "deploy.prototxt", folder / "lenet_digits.caffemodel",
                                                      engine="onnxruntime", calibration=calibration)
    with load() as net:
        fp32 = float((net.run({"data": x_test})["prob"].argmax(1) == y_test).mean())
    rows = [{"variant": "FP32", "accuracy": fp32}]
    for precision, method in variants(methods):
        path = calibrated(load, {"data": x_train}, precision, method, workdir, batch=64)
        with load(path) as net:
            acc = float((net.run({"data": x_test})["prob"].argmax(1) == y_test).mean())
        rows.append({"variant": label(precision, method), "accuracy": acc, "points_vs_fp32": 100 * (acc - fp32)})
    return {"calibration": f"{len(x_train)} training digits", "evaluation": f"{len(y_test)} test digits",
            "rows": rows}


def hyperlpr(methods: list[str], workdir: Path) -> dict[str, Any]:
    folder = SHARED / "hyperlpr_mininet_ssd"
    shape = (1, 3, 720, 1280)
    image = load_input(folder / "images/test.jpg", shape,
                       Preprocessing(scale=1 / (255 * 0.226), mean=(123.7, 116.3, 103.5), channel_order="rgb"))
    load = lambda calibration=None: hybrid_infer.load(
        folder / "mininet_ssd_v1.prototxt", folder / "mininet_ssd_v1.caffemodel", engine="onnxruntime",
        input_shapes={"data": shape}, calibration=calibration)
    with load() as net:
        (blob,) = net.output_blobs
        reference = net.run_caffe({"data": image})[blob]
        fp32 = net.run({"data": image})[blob]
        thresholds = detection_outputs(net.graph)[blob]

    def differ(detections: np.ndarray) -> int:
        """Detections found on one side only, this run's or Caffe FP32's."""
        found = compare_detections(detections, reference, thresholds, 1e-4)
        return sum(d.kind in ("missing", "extra") for d in found.diffs)
    scale = np.array([shape[3], shape[2], shape[3], shape[2]])

    def plates(detections: np.ndarray) -> list[list[float]]:
        return [row.tolist() for row in detections.reshape(-1, 7) if row[2] >= 0.5]

    rows = [{"variant": "FP32", "plates": plates(fp32), "differ_vs_caffe": differ(fp32)}]
    for precision, method in variants(methods):
        path = calibrated(load, {"data": image}, precision, method, workdir)
        with load(path) as net:
            got = net.run({"data": image})[blob]
        shift = None
        if plates(got) and plates(fp32) and len(plates(got)) == len(plates(fp32)):
            shift = float(max(np.abs((np.array(a[3:]) - np.array(b[3:])) * scale).max()
                              for a, b in zip(plates(got), plates(fp32))))
        rows.append({"variant": label(precision, method), "plates": plates(got),
                     "differ_vs_caffe": differ(got), "max_box_shift_px": shift})
    return {"calibration": "its sample photo (1280x720)", "rows": rows}


def _y(rgb: np.ndarray) -> np.ndarray:
    """Luma as MATLAB's rgb2ycbcr (BT.601, 16..235) scaled to 0..1, the model's training input."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return (16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255) / 255


def fsrcnn(methods: list[str], workdir: Path) -> dict[str, Any]:
    from PIL import Image
    folder = SHARED / "fsrcnn"
    size = 85  # low-resolution crop; the x3 deconvolution gives 3 * 85 - 2 = 253 pixels
    lows, truths = {}, {}
    for name in ("bird", "butterfly"):
        y = _y(np.asarray(Image.open(folder / f"images/{name}_GT.bmp").convert("RGB")))
        n = (min(y.shape) // 3) * 3
        y = y[:n, :n]
        low = np.asarray(Image.fromarray((y * 255).astype(np.float32), mode="F")
                         .resize((n // 3, n // 3), Image.BICUBIC), dtype=np.float64) / 255
        top = (n // 3 - size) // 2
        lows[name] = low[top:top + size, top:top + size][None, None].astype(np.float32)
        # Output pixel i sits at high-resolution pixel 3 * top + i + 2 (measured: best alignment).
        start = 3 * top + 2
        truths[name] = y[start:start + 3 * size - 2, start:start + 3 * size - 2]
    shape = (1, 1, size, size)
    load = lambda calibration=None: hybrid_infer.load(
        folder / "FSRCNN_mat.prototxt", folder / "snapshot_iter_2546000.caffemodel", engine="onnxruntime",
        input_shapes={"data": shape}, calibration=calibration)

    def psnr(out: np.ndarray, truth: np.ndarray, shave: int = 4) -> float:
        diff = np.clip(out[0, 0], 0, 1)[shave:-shave, shave:-shave] - truth[shave:-shave, shave:-shave]
        return float(10 * np.log10(1 / np.mean(diff ** 2)))

    def measure(calibration=None) -> dict[str, float]:
        with load(calibration) as net:
            (blob,) = net.output_blobs
            return {name: psnr(net.run({"data": lows[name]})[blob], truths[name]) for name in lows}

    rows = [{"variant": "FP32", "psnr_db": measure()}]
    both = {"data": np.concatenate(list(lows.values()))}
    for precision, method in variants(methods):
        rows.append({"variant": label(precision, method),
                     "psnr_db": measure(calibrated(load, both, precision, method, workdir))})
    return {"calibration": "both images' low-resolution inputs", "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | variant | measure | value |", "|---|---|---|---|"]
    for row in report["lenet"]["rows"]:
        extra = f" ({row['points_vs_fp32']:+.2f} points)" if "points_vs_fp32" in row else ""
        lines.append(f"| LeNet digits | {row['variant']} | test accuracy | {row['accuracy']:.2%}{extra} |")
    if "hyperlpr" in report:
        for row in report["hyperlpr"]["rows"]:
            shown = row["plates"][:3]
            boxes = "; ".join(f"label {int(p[1])} score {p[2]:.3f}" for p in shown) or "none"
            if len(row["plates"]) > len(shown):
                boxes += f" (and {len(row['plates']) - len(shown)} more)"
            shift = (f", box moved at most {row['max_box_shift_px']:.1f} px"
                     if row.get("max_box_shift_px") is not None else "")
            lines.append(f"| hyperlpr SSD | {row['variant']} | plates (score >= 0.5) | {boxes}{shift}; "
                         f"detections differing from Caffe FP32: {row['differ_vs_caffe']} |")
    if "fsrcnn" in report:
        for row in report["fsrcnn"]["rows"]:
            values = ", ".join(f"{k} {v:.2f} dB" for k, v in row["psnr_db"].items())
            lines.append(f"| FSRCNN x3 | {row['variant']} | PSNR vs ground truth (Y) | {values} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["entropy", "minmax", "percentile"])
    parser.add_argument("--out", type=Path, default=REPO / "results")
    args = parser.parse_args()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "onnxruntime": __import__("onnxruntime").__version__}
    with tempfile.TemporaryDirectory(prefix="hybrid_precision_") as tmp:
        workdir = Path(tmp)
        for name, measure in (("lenet", lenet), ("hyperlpr", hyperlpr), ("fsrcnn", fsrcnn)):
            if name != "lenet" and not SHARED.is_dir():
                print(f"{SHARED} is absent: skipping {name}", file=sys.stderr)
                continue
            start = time.perf_counter()
            report[name] = measure(args.methods, workdir)
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "precision.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
