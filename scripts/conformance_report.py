#!/usr/bin/env python3
"""Measure every conformance model end to end and print one table.

For each model: the partition (TensorRT and Caffe segments), the largest relative L2
error of the hybrid against pure Caffe over the compared blobs with each installed CPU
engine (ONNX Runtime, OpenVINO) for the TensorRT segments, and, for each TensorRT segment,
a real TensorRT(-RTX) engine build: seconds and plan size.
Models in ../shared/models are third-party test data and are skipped when absent.

    .venv/bin/python scripts/conformance_report.py [--json results/conformance.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "models"
GRAPHS = REPO / "graphs"
sys.path.insert(0, str(GRAPHS / "python_layers"))

import hybrid_infer  # noqa: E402
from hybrid_infer.api import HybridNet  # noqa: E402
from hybrid_infer.engines.engine_cache import EngineCache  # noqa: E402
from hybrid_infer.engines.tensorrt_build import BuildSettings  # noqa: E402
from hybrid_infer.executor.engine_choice import available_candidates  # noqa: E402
from hybrid_infer.executor.engine_factory import segment_onnx  # noqa: E402
from hybrid_infer.detections import detection_outputs  # noqa: E402
from hybrid_infer.metrics import compare_outputs  # noqa: E402
from hybrid_infer.partition.partitioner import TENSORRT  # noqa: E402

# (label, prototxt, weights or None for random weights, load options)
MODELS = [
    ("lenet_digits (own)", GRAPHS / "lenet_digits/deploy.prototxt", GRAPHS / "lenet_digits/lenet_digits.caffemodel", {}),
    ("python_layer_net (own)", GRAPHS / "python_layer_net/deploy.prototxt", None, {"min_segment_size": 1}),
    *[(f"python layer at {pos} (own)", GRAPHS / f"python_layer_positions/python_layer_{pos}.prototxt", None,
       {"min_segment_size": 1}) for pos in ("start", "branch", "end")],
    ("lenet_mnist", SHARED / "lenet_mnist/mnist_deploy.prototxt", SHARED / "lenet_mnist/lenet_iter_10000.caffemodel", {}),
    ("cifar10_full", SHARED / "cifar10_full/cifar10_full.prototxt", SHARED / "cifar10_full/cifar10_full_iter_70000.caffemodel", {}),
    ("fsrcnn", SHARED / "fsrcnn/FSRCNN_mat.prototxt", SHARED / "fsrcnn/snapshot_iter_2546000.caffemodel", {}),
    *[(f"mtcnn det{i}", SHARED / f"mtcnn/det{i}.prototxt", SHARED / f"mtcnn/det{i}.caffemodel", {}) for i in range(1, 5)],
    ("hyperlpr_mininet_ssd", SHARED / "hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt",
     SHARED / "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel", {}),
    ("mobilenet_ssd", SHARED / "mobilenet_ssd/MobileNetSSD_deploy.prototxt", None, {}),
    ("googlenet", SHARED / "bvlc_googlenet/deploy.prototxt", None, {}),
    ("alexnet", SHARED / "bvlc_alexnet/deploy.prototxt", None, {}),
    ("caffenet", SHARED / "bvlc_caffenet/deploy.prototxt", None, {}),
    ("resnet_50", SHARED / "resnet_50/ResNet-50-deploy.prototxt", None, {}),
    ("squeezenet_v1.1", SHARED / "squeezenet_v1.1/deploy.prototxt", None, {}),
    ("mobilenet_v1", SHARED / "mobilenet_v1/mobilenet_deploy.prototxt", None, {}),
]


def measure(label: str, prototxt: Path, weights: Path | None, options: dict, cache_dir: str) -> dict:
    probe = hybrid_infer.load(prototxt, weights, random_weights=None if weights else 2026, **options)
    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal(s).astype(np.float32) for n, s in probe.input_shapes().items()}
    errors_by_engine = {}
    for engine in available_candidates():
        with HybridNet(probe.model, engine=engine, outputs=probe.outputs_with_logits(), **options) as net:
            got, want = net.run(inputs), net.run_caffe(inputs)
            # DetectionOutput rows are matched as detections; their error is over the matched rows
            compared = compare_outputs(got, want, detections=detection_outputs(net.graph))
            errors_by_engine[engine] = {row.name: row.rel_l2 if row.within(1e-4) else float("inf")
                                        for row in compared}
    errors = errors_by_engine["onnxruntime"]
    builds = []
    cache = EngineCache(cache_dir)
    for segment in net.partition.segments:
        if segment.backend == TENSORRT:
            built, _ = cache.get_or_build(segment_onnx(net.graph, net.model, segment), BuildSettings(),
                                          label=f"{label} segment{segment.id}")
            builds.append({"segment": segment.id, "layers": len(segment.layers),
                           "build_s": round(built.build_seconds, 3), "plan_mib": round(built.plan_size / 2**20, 2)})
    backends = [s.backend for s in net.partition.segments]
    return {"model": label, "weights": "trained" if weights else "random (seed 2026)",
            "segments": {"tensorrt": backends.count("tensorrt"), "caffe": backends.count("caffe")},
            "max_rel_l2": max(errors.values()), "errors": errors,
            "max_rel_l2_by_engine": {e: max(errs.values()) for e, errs in errors_by_engine.items()},
            "tensorrt_builds": builds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = []
    todo = [m for m in MODELS if m[1].exists()]
    skipped = [m[0] for m in MODELS if not m[1].exists()]
    with tempfile.TemporaryDirectory(prefix="hybrid_infer_conformance_") as cache_dir:
        for i, (label, prototxt, weights, options) in enumerate(todo, 1):
            start = time.perf_counter()
            print(f"[{i}/{len(todo)}] {label} ...", file=sys.stderr, flush=True)
            rows.append(measure(label, prototxt, weights, options, cache_dir))
            for entry in Path(cache_dir).iterdir():  # plans of big nets are hundreds of MiB
                entry.unlink()
            print(f"        {time.perf_counter() - start:.1f} s", file=sys.stderr)
    engines = list(rows[0]["max_rel_l2_by_engine"]) if rows else []
    header = (f"{'model':28} {'weights':18} {'trt/caffe segs':>14} "
              + " ".join(f"{'rel L2 ' + e:>18}" for e in engines) + "  TensorRT builds (s, MiB)")
    print(header)
    print("-" * len(header))
    for r in rows:
        builds = ", ".join(f"{b['build_s']:.2f} s {b['plan_mib']:.1f} MiB" for b in r["tensorrt_builds"])
        print(f"{r['model']:28} {r['weights']:18} {r['segments']['tensorrt']:>6}/{r['segments']['caffe']:<7} "
              + " ".join(f"{r['max_rel_l2_by_engine'][e]:>18.2e}" for e in engines) + f"  {builds}")
    if skipped:
        print(f"\nnot measured ({SHARED} absent): {', '.join(skipped)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        tmp.replace(args.json)
    return 0 if all(e <= 1e-4 for r in rows for e in r["max_rel_l2_by_engine"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
