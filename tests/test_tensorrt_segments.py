"""Every TensorRT segment of the conformance models parses and builds with the real builder,
and runs on the GPU where a TensorRT runtime exists (skipped with the reason otherwise)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.engines import trt_api
from hybrid_infer.engines.engine_cache import EngineCache
from hybrid_infer.engines.tensorrt_build import BuildSettings
from hybrid_infer.engines.tensorrt_engine import runtime_available
from hybrid_infer.executor.engine_factory import segment_onnx
from hybrid_infer.detections import detection_outputs
from hybrid_infer.metrics import compare_outputs
from hybrid_infer.partition.partitioner import TENSORRT

from conftest import GRAPHS, REPO

RUNTIME_OK, RUNTIME_REASON = runtime_available()

SHARED = [  # (prototxt, weights or None for random)
    ("bvlc_googlenet/deploy.prototxt", None), ("bvlc_alexnet/deploy.prototxt", None),
    ("resnet_50/ResNet-50-deploy.prototxt", None), ("squeezenet_v1.1/deploy.prototxt", None),
    ("mobilenet_v1/mobilenet_deploy.prototxt", None), ("mobilenet_ssd/MobileNetSSD_deploy.prototxt", None),
    ("hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt", "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel"),
    ("cifar10_full/cifar10_full.prototxt", "cifar10_full/cifar10_full_iter_70000.caffemodel"),
    ("fsrcnn/FSRCNN_mat.prototxt", "fsrcnn/snapshot_iter_2546000.caffemodel"),
    ("lenet_mnist/mnist_deploy.prototxt", "lenet_mnist/lenet_iter_10000.caffemodel"),
    ("mtcnn/det1.prototxt", "mtcnn/det1.caffemodel"), ("mtcnn/det2.prototxt", "mtcnn/det2.caffemodel"),
    ("mtcnn/det3.prototxt", "mtcnn/det3.caffemodel"), ("mtcnn/det4.prototxt", "mtcnn/det4.caffemodel"),
]
OWN = ["lenet_digits/deploy.prototxt", "python_layer_net/deploy.prototxt",
       "python_layer_positions/python_layer_start.prototxt",
       "python_layer_positions/python_layer_branch.prototxt",
       "python_layer_positions/python_layer_end.prototxt"]


@pytest.fixture(scope="module")
def rtx():
    return trt_api.load("tensorrt_rtx")


def _open(relpath: str, weights: str | None, folder):
    path = folder / relpath
    if weights:
        return hybrid_infer.load(path, folder / weights, min_segment_size=1)
    return hybrid_infer.load(path, random_weights=3, min_segment_size=1)


def _build_all(net, rtx, cache_dir) -> int:
    cache = EngineCache(cache_dir)
    built_count = 0
    for segment in net.partition.segments:
        if segment.backend != TENSORRT:
            continue
        model = segment_onnx(net.graph, net.model, segment, check=True)
        built, lookup = cache.get_or_build(model, BuildSettings(batch_max=2), api=rtx, label=f"seg{segment.id}")
        assert built.plan_size > 0 and not lookup.hit
        assert sorted(built.input_names) == sorted(segment.inputs)
        assert sorted(built.output_names) == sorted(segment.outputs)
        again, lookup = cache.get_or_build(model, BuildSettings(batch_max=2), api=rtx)
        assert lookup.hit and again.plan == built.plan
        built_count += 1
    return built_count


@pytest.mark.parametrize("relpath,weights", SHARED, ids=[p for p, _ in SHARED])
def test_shared_model_segments_build(shared_models, rtx, tmp_path, relpath, weights):
    net = _open(relpath, weights, shared_models)
    try:
        assert _build_all(net, rtx, tmp_path) >= 1
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # plans of big nets are hundreds of MiB


@pytest.mark.parametrize("relpath", OWN)
def test_own_graph_segments_build(monkeypatch, rtx, tmp_path, relpath):
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))
    weights = "lenet_digits/lenet_digits.caffemodel" if relpath.startswith("lenet") else None
    assert _build_all(_open(relpath, weights, GRAPHS), rtx, tmp_path) >= 1


def test_build_command_reports_then_hits_the_cache(tmp_path):
    cmd = [sys.executable, "-m", "hybrid_infer.cli.main", "build", str(GRAPHS / "lenet_digits/deploy.prototxt"),
           "--weights", str(GRAPHS / "lenet_digits/lenet_digits.caffemodel"), "--engine-cache", str(tmp_path),
           "--tensorrt-module", "tensorrt_rtx", "--max-batch", "8"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "built in" in first and "plan" in first
    second = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "cache hit" in second
    fp16 = subprocess.run(cmd + ["--fp16", "--workspace", "64"], capture_output=True, text=True, check=True).stdout
    assert "built in" in fp16


def test_engine_tensorrt_without_runtime_is_a_clear_error():
    if RUNTIME_OK:
        pytest.skip(f"a TensorRT runtime can execute here: {RUNTIME_REASON}")
    proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "run",
                           str(GRAPHS / "lenet_digits/deploy.prototxt"), "--weights",
                           str(GRAPHS / "lenet_digits/lenet_digits.caffemodel"), "--engine", "tensorrt"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--engine tensorrt cannot run here" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not RUNTIME_OK, reason=RUNTIME_REASON)
@pytest.mark.parametrize("fp16,tolerance", [(False, 1e-4), (True, 1e-2)])
@pytest.mark.parametrize("relpath,weights", SHARED, ids=[p for p, _ in SHARED])
def test_tensorrt_hybrid_matches_caffe(shared_models, tmp_path, relpath, weights, fp16, tolerance):
    path = shared_models / relpath
    kwargs = {"weights": shared_models / weights} if weights else {"random_weights": 3}
    net = hybrid_infer.load(path, engine="tensorrt", build_settings=BuildSettings(fp16=fp16, batch_max=2),
                            engine_cache=EngineCache(tmp_path), **kwargs)
    rng = np.random.default_rng()
    inputs = {n: rng.standard_normal(s).astype(np.float32) for n, s in net.input_shapes().items()}
    got, want = net.run(inputs), net.run_caffe(inputs)
    assert all(se.engine.kind in ("tensorrt", "caffe") for se in net.segment_engines)
    # SSD nets' DetectionOutput rows are compared as detections (differences only from near-ties)
    for row in compare_outputs(got, want, detections=detection_outputs(net.graph), tolerance=tolerance):
        assert row.within(tolerance), (row.name, row.rel_l2, row.detections and row.detections.summary())
