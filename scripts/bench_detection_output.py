#!/usr/bin/env python
"""What SSD's DetectionOutput costs lowered (ONNX Runtime, CPU) against Caffe's own layer.

The layer alone is timed, on the inputs a real net gives it: each case builds a net of
just DetectionOutput (the published parameters, or the ones in the case) and feeds it the
location, confidence and prior blobs that pure Caffe computed for the detector:

- ``mobilenet_ssd`` (random weights, random image): confidence_threshold 0.01, so that
  random scores (about 1/21) all pass and every class has top_k candidates: NMS's worst
  case for the sizes; top_k = keep_top_k = 100 and 400 (and 900 at batch 8);
- ``hyperlpr_ssd`` (trained, its plate photo): as published (2 classes, top_k 400,
  confidence 0.01, keep_top_k 100);
- ``chain``: 400 priors in a row, each overlapping the next (IoU 0.54 > 0.45), scores
  falling along the row, 20 classes: NMS keeps every other box, the longest dependency
  between candidates there can be.

Each case and runtime runs in a process of its own, which reports the median of ``--runs``
calls after ``--warmup`` and its peak resident memory above what it held before the first
call (which, lowered, builds the ONNX Runtime session and grows its arena). The lowered layer's rows are checked against Caffe's as detections first.

    .venv/bin/python scripts/bench_detection_output.py [--runs 10] [--out results/ssd]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402

DETECTOR = {"mobilenet_ssd": ("mobilenet_ssd/MobileNetSSD_deploy.prototxt", None),
            "hyperlpr_ssd": ("hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt",
                             "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel")}
#: (name, source, batch, detection_output_param overrides)
CASES = [(f"mobilenet_ssd top_k {k}", "mobilenet_ssd", b, {"top_k": k, "keep_top_k": k, "confidence_threshold": 0.01})
         for k in (100, 400) for b in (1, 8)]
CASES += [("mobilenet_ssd top_k 900", "mobilenet_ssd", 8, {"top_k": 900, "keep_top_k": 900, "confidence_threshold": 0.01})]
CASES += [("hyperlpr_ssd (trained, plate photo)", "hyperlpr_ssd", b, {}) for b in (1, 8)]
CASES += [("chain of 400 overlapping boxes", "chain", b, {}) for b in (1, 8)]


def detection_net(param, shapes: dict[str, tuple[int, ...]]) -> str:
    """A prototxt of Input layers for loc, conf, prior and one DetectionOutput ``param``."""
    from google.protobuf import text_format
    inputs = "".join(f'layer {{ name: "{n}" type: "Input" top: "{n}" input_param {{ shape {{ '
                     + " ".join(f"dim: {d}" for d in s) + " } } }\n" for n, s in shapes.items())
    return (inputs + 'layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
            f'top: "out" detection_output_param {{ {text_format.MessageToString(param, as_one_line=True)} }} }}\n')


def detector_inputs(source: str, batch: int, overrides: dict) -> tuple[str, dict[str, np.ndarray]]:
    """The DetectionOutput-only prototxt and its inputs, from pure Caffe on the detector."""
    import caffe
    from hybrid_infer.inputs import Preprocessing, load_image
    from hybrid_infer.model.caffe_model import CaffeModel
    prototxt, weights = DETECTOR[source]
    model = CaffeModel(SHARED / prototxt, SHARED / weights if weights else None)
    if weights is None:
        model.set_random_weights(1)
    layer = next(l for l in model.net.layer if l.type == "DetectionOutput")
    net = model.reference_net()
    name = list(net.inputs)[0]
    shape = list(net.blobs[name].shape)
    if weights:  # the plate photo, preprocessed as the README's hyperlpr example
        prep = Preprocessing(scale=0.01735, mean=(123.675, 116.28, 103.53), channel_order="rgb")
        data = load_image(SHARED / "hyperlpr_mininet_ssd/images/test.jpg", shape, prep)[0]
    else:
        data = np.random.default_rng(0).normal(size=shape[1:])
    net.blobs[name].reshape(batch, *shape[1:])
    net.reshape()
    net.forward(**{name: np.broadcast_to(data, (batch, *shape[1:])).astype(np.float32)})
    feeds = {k: np.array(net.blobs[b].data, copy=True) for k, b in zip(("loc", "conf", "prior"), layer.bottom)}
    feeds["prior"] = np.repeat(feeds["prior"], batch, axis=0)  # net inputs share a batch; Caffe reads item 0
    param = caffe.proto.caffe_pb2.DetectionOutputParameter()
    param.CopyFrom(layer.detection_output_param)
    for field, value in overrides.items():
        setattr(param.nms_param if field == "top_k" else param, field, value)
    return detection_net(param, {k: v.shape for k, v in feeds.items()}), feeds


def chain_inputs(batch: int) -> tuple[str, dict[str, np.ndarray]]:
    priors, classes = 400, 21
    x = np.arange(priors) * 0.003
    boxes = np.stack([x, np.zeros(priors), x + 0.01, np.full(priors, 0.01)], 1)
    prior = np.stack([boxes.ravel(), np.full(priors * 4, 0.1)])[None].astype(np.float32)
    conf = np.tile((1 - np.arange(priors) * 1e-3)[:, None], (1, classes)).ravel()
    feeds = {"loc": np.zeros((batch, priors * 4), np.float32), "conf": np.tile(conf, (batch, 1)).astype(np.float32),
             "prior": np.repeat(prior, batch, axis=0)}
    import caffe
    param = caffe.proto.caffe_pb2.DetectionOutputParameter(
        num_classes=classes, background_label_id=0, code_type=1, keep_top_k=200, confidence_threshold=0.01)
    param.nms_param.nms_threshold, param.nms_param.top_k = 0.45, 400
    return detection_net(param, {k: v.shape for k, v in feeds.items()}), feeds


def status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(workdir: Path, runtime: str, runs: int, warmup: int) -> dict:
    """In this process: one runtime on the case in ``workdir``; median seconds, peak MiB."""
    from hybrid_infer.analysis.timing import time_calls
    feeds = dict(np.load(workdir / "feeds.npz"))
    if runtime == "caffe":
        import caffe
        caffe.set_mode_cpu()
        net = caffe.Net(str(workdir / "net.prototxt"), caffe.TEST)
        for k, v in feeds.items():
            net.blobs[k].reshape(*v.shape)
        net.reshape()

        def call() -> np.ndarray:
            return np.array(net.forward(**feeds)["out"], copy=True)
    else:
        import hybrid_infer
        net = hybrid_infer.load(str(workdir / "net.prototxt"), engine="onnxruntime")
        assert len(net.partition.segments) == 1, "DetectionOutput was not lowered"
        call = lambda: net.run(feeds)["out"]
    reset_peak()
    before = status_kib("VmRSS")
    out = call()  # ONNX Runtime builds its session and arena here: counted in the peak
    timing = time_calls(call, runs, warmup)
    np.save(workdir / f"{runtime}.npy", out)
    return {"median_s": timing.median, "peak_mib": (status_kib("VmHWM") - before) / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "results" / "ssd")
    p.add_argument("--measure", nargs=2, metavar=("DIR", "RUNTIME"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.runs, args.warmup)))
        return 0
    from hybrid_infer.detections import compare_detections, detection_outputs
    from hybrid_infer.testing import load_text
    rows = []
    for name, source, batch, overrides in CASES:
        text, feeds = chain_inputs(batch) if source == "chain" else detector_inputs(source, batch, overrides)
        with tempfile.TemporaryDirectory(prefix="bench_det_") as tmp:
            work = Path(tmp)
            (work / "net.prototxt").write_text(text)
            np.savez(work / "feeds.npz", **feeds)
            result = {}
            for runtime in ("caffe", "lowered"):
                done = subprocess.run([sys.executable, __file__, "--measure", str(work), runtime, "--runs",
                                       str(args.runs), "--warmup", str(args.warmup)], capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{name}, batch {batch}, {runtime}: failed\n{done.stderr[-3000:]}")
                result[runtime] = json.loads(done.stdout.strip().splitlines()[-1])
            want, got = np.load(work / "caffe.npy"), np.load(work / "lowered.npy")
            _, graph = load_text(text)
            found = compare_detections(got, want, detection_outputs(graph)["out"], 1e-5)
        rows.append({"case": name, "batch": batch, "rows": int(want.shape[2]), "same_as_caffe": found.ok,
                     **{f"{r}_{k}": v for r, m in result.items() for k, v in m.items()}})
        r = rows[-1]
        print(f"{name:38s} b{batch}: Caffe {r['caffe_median_s'] * 1e3:8.1f} ms {r['caffe_peak_mib']:7.1f} MiB | "
              f"lowered {r['lowered_median_s'] * 1e3:8.1f} ms {r['lowered_peak_mib']:7.1f} MiB | "
              f"{r['rows']} rows, {'same as Caffe' if found.ok else found.summary()}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection_output.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| case | batch | rows | Caffe ms | lowered ms | lowered / Caffe | Caffe peak MiB | lowered peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['batch']} | {r['rows']} | {r['caffe_median_s'] * 1e3:.1f} | "
              f"{r['lowered_median_s'] * 1e3:.1f} | {r['lowered_median_s'] / r['caffe_median_s']:.2f}x | "
              f"{r['caffe_peak_mib']:.0f} | {r['lowered_peak_mib']:.0f} |" for r in rows]
    (args.out / "detection_output.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["same_as_caffe"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
