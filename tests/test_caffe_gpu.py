"""Caffe on the GPU: per model against Caffe on the CPU, hybrids with Caffe GPU segments
against pure Caffe, device-pointer hand-offs between Caffe GPU segments, and device
selection. Tests marked ``gpu`` skip, with the reason, where Caffe has no CUDA or no GPU
is visible; the error paths for a CPU-only Caffe run everywhere."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.engines.caffe_gpu_engine import CaffeGpuEngine, use_gpu
from hybrid_infer.errors import EnvironmentProblem, OptionError
from hybrid_infer.executor.hybrid_executor import (DEVICE_POINTER, DEVICE_TO_HOST, HOST_ROUND_TRIP,
                                                   HOST_TO_DEVICE, OUTPUT)
from hybrid_infer.metrics import relative_l2
from hybrid_infer.model.caffe_import import caffe
from hybrid_infer.native import blob_access
from hybrid_infer.partition.partitioner import CAFFE

from conftest import GRAPHS, REPO, SHARED_MODELS

GPU_TOLERANCE = 1e-5     # Caffe GPU vs Caffe CPU: same algorithms, other summation order
HYBRID_TOLERANCE = 1e-4  # as in test_models_conformance.py
LENET = GRAPHS / "lenet_digits"


@pytest.fixture(scope="module")
def gpu():
    """GPU 0 for Caffe, or skip saying why Caffe cannot have it."""
    try:
        device = use_gpu(0)
    except EnvironmentProblem as exc:
        pytest.skip(f"no Caffe GPU: {exc}")
    caffe().set_mode_cpu()  # engines and run_caffe set the mode they need
    return device

# (folder, prototxt, weights or None for random ones, input shape override or None)
OWN = [(GRAPHS, "lenet_digits/deploy.prototxt", "lenet_digits/lenet_digits.caffemodel", None),
       (GRAPHS, "python_layer_net/deploy.prototxt", None, None),
       (GRAPHS, "python_layer_positions/python_layer_start.prototxt", None, None),
       (GRAPHS, "python_layer_positions/python_layer_branch.prototxt", None, None),
       (GRAPHS, "python_layer_positions/python_layer_end.prototxt", None, None)]
SHARED = [(SHARED_MODELS, path, weights, shape) for path, weights, shape in [
    ("bvlc_alexnet/deploy.prototxt", None, None),
    ("bvlc_googlenet/deploy.prototxt", None, None),
    ("resnet_50/ResNet-50-deploy.prototxt", None, None),
    ("squeezenet_v1.1/deploy.prototxt", None, None),
    ("mobilenet_v1/mobilenet_deploy.prototxt", None, None),
    ("mobilenet_ssd/MobileNetSSD_deploy.prototxt", None, None),
    ("hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt", "hyperlpr_mininet_ssd/mininet_ssd_v1.caffemodel", None),
    ("cifar10_full/cifar10_full.prototxt", "cifar10_full/cifar10_full_iter_70000.caffemodel", None),
    ("fsrcnn/FSRCNN_mat.prototxt", "fsrcnn/snapshot_iter_2546000.caffemodel", None),
    ("lenet_mnist/mnist_deploy.prototxt", "lenet_mnist/lenet_iter_10000.caffemodel", None),
    ("mtcnn/det1.prototxt", "mtcnn/det1.caffemodel", None),
    ("mtcnn/det2.prototxt", "mtcnn/det2.caffemodel", None),
    ("mtcnn/det3.prototxt", "mtcnn/det3.caffemodel", None),
    ("mtcnn/det4.prototxt", "mtcnn/det4.caffemodel", None)]]
MODELS = OWN + SHARED


@pytest.fixture(autouse=True)
def _python_layers(monkeypatch):
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))


def _load(folder, relpath, weights, shape, **kwargs):
    if not (folder / relpath).is_file():
        pytest.skip(f"{folder / relpath} is absent (third-party models live in ../shared/models)")
    shapes = {"data": shape} if shape else None
    if weights:
        return hybrid_infer.load(folder / relpath, folder / weights, input_shapes=shapes, **kwargs)
    return hybrid_infer.load(folder / relpath, random_weights=7, input_shapes=shapes, **kwargs)


def _inputs(net, batch: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {name: rng.standard_normal(((batch or shape[0]), *shape[1:])).astype(np.float32)
            for name, shape in net.input_shapes().items()}


def _max_error(got, want) -> float:
    return max(relative_l2(got[blob], want[blob]) for blob in want)


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu")
@pytest.mark.parametrize("folder,relpath,weights,shape", MODELS, ids=[m[1] for m in MODELS])
def test_caffe_gpu_matches_caffe_cpu(folder, relpath, weights, shape):
    net = _load(folder, relpath, weights, shape)
    for batch in (1, 2):
        x = _inputs(net, batch)
        error = _max_error(net.run_caffe(x, device=0), net.run_caffe(x))
        assert error <= GPU_TOLERANCE, f"batch {batch}: relative L2 {error:.3g}"


# Conformance models whose partitions have Caffe segments (Python layers, SSD's layers)
HYBRIDS = [m for m in MODELS if "python_layer" in m[1] or "ssd" in m[1]]


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu")
@pytest.mark.parametrize("folder,relpath,weights,shape", HYBRIDS, ids=[m[1] for m in HYBRIDS])
def test_hybrid_with_caffe_gpu_segments_matches_pure_caffe(folder, relpath, weights, shape):
    # SSDs run whole in one engine since DetectionOutput is lowered: put it back in Caffe here
    fallback = ["DetectionOutput"] if "ssd" in relpath else []
    net = _load(folder, relpath, weights, shape, engine="onnxruntime", device=0, fallback=fallback)
    assert any(s.backend == CAFFE for s in net.partition.segments)
    x = _inputs(net)
    error = _max_error(net.run(x), net.run_caffe(x))
    assert error <= HYBRID_TOLERANCE, f"relative L2 {error:.3g}"
    kinds = {se.segment.backend: se.engine.kind for se in net.segment_engines}
    assert kinds[CAFFE] == "caffe-gpu"
    # ONNX Runtime (host) and Caffe GPU segments meet: one copy each way at each boundary
    for h in net.handoffs():
        assert h.path in (HOST_TO_DEVICE, DEVICE_TO_HOST, "host"), h
    net.close()


def _lenet_chain(**kwargs):
    """The bundled digit classifier cut into three Caffe GPU segments."""
    return hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", engine="caffe",
                             fallback=["pool1", "pool2"], min_segment_size=1, device=0, **kwargs)


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu")
def test_chain_of_caffe_gpu_segments_passes_device_pointers():
    net = _lenet_chain(outputs=["prob", "ip2"])
    assert len(net.partition.segments) >= 3
    engines = [se.engine for se in net.segment_engines]
    assert all(isinstance(e, CaffeGpuEngine) for e in engines)
    x = np.concatenate([np.load(p) for p in sorted((LENET / "samples").glob("digit_*.npy"))])
    got = net.run({"data": x})
    want = net.run_caffe({"data": x})
    assert _max_error(got, want) <= GPU_TOLERANCE
    labels = [int(p.stem.split("_")[1]) for p in sorted((LENET / "samples").glob("digit_*.npy"))]
    assert np.argmax(got["prob"], axis=1).tolist() == labels

    between = [h for h in net.handoffs() if h.source.startswith("segment") and h.target.startswith("segment")]
    assert len(between) >= 2 and all(h.path == DEVICE_POINTER and h.copied_bytes == 0 for h in between)
    assert [h.path for h in net.handoffs() if h.source == "input"] == [HOST_TO_DEVICE]
    assert {h.path for h in net.handoffs() if h.target == OUTPUT} == {DEVICE_TO_HOST}
    # Host transfers as the engines counted them: the input up, the two outputs down, nothing else
    uploads = sum(e.transfers.uploads for e in engines)
    downloads = sum(e.transfers.downloads for e in engines)
    assert (uploads, downloads) == (1, 2)
    # ...and as Caffe's memory says: no activation was ever copied to the host
    for engine in engines:
        heads = engine.blob_heads()
        assert set(heads.values()) <= {"gpu", "uninitialized"}, heads

    again = net.run({"data": x})  # second run reuses the engines and lends again
    np.testing.assert_array_equal(again["prob"], got["prob"])
    net.close()


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu")
def test_host_path_between_gpu_segments_gives_the_same_result():
    x = np.load(sorted((LENET / "samples").glob("digit_*.npy"))[0])
    on, off = _lenet_chain(), _lenet_chain(zero_copy=False)
    np.testing.assert_array_equal(on.run({"data": x})["prob"], off.run({"data": x})["prob"])
    between = [h for h in off.handoffs() if h.source.startswith("segment") and h.target.startswith("segment")]
    assert between and all(h.path == HOST_ROUND_TRIP and h.copied_bytes == 2 * h.nbytes for h in between)
    on.close()
    off.close()


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu")
def test_device_selection():
    native = blob_access()
    net = hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", device=0)
    assert net.gpu is not None and net.gpu.index == 0 and net.gpu.name == native.device_name(0)
    assert native.current_device() == 0
    count = native.device_count()
    with pytest.raises(OptionError, match=rf"--device {count}: there is no GPU {count}; this machine has {count}"):
        hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", device=count)
    with pytest.raises(OptionError, match="device must be 0 or more, not -1"):
        hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", device=-1)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hybrid_infer.cli.main", "run", str(LENET / "deploy.prototxt"),
               "--weights", str(LENET / "lenet_digits.caffemodel"), "--input",
               str(sorted((LENET / "samples").glob("digit_*.npy"))[0]), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu")
def test_cli_device_runs_caffe_segments_on_the_gpu():
    proc = _cli("--device", "0", "--engine", "caffe", "--fallback", "pool1", "--min-segment-size", "1", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "caffe-gpu" in proc.stdout and DEVICE_POINTER in proc.stdout, proc.stdout
    wrong = _cli("--device", "7")
    assert wrong.returncode == 2 and "--device 7: there is no GPU 7" in wrong.stderr, wrong.stderr


@pytest.mark.gpu
@pytest.mark.usefixtures("gpu")
def test_cli_device_without_a_visible_gpu_says_so():
    proc = _cli("--device", "0", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    assert "Caffe cannot run on a GPU here: no usable CUDA device" in proc.stderr, proc.stderr


def test_cpu_only_caffe_refuses_a_device_clearly():
    if blob_access().cuda_enabled():
        pytest.skip("this Caffe has CUDA: the gpu tests above cover --device")
    with pytest.raises(EnvironmentProblem, match=r"built without CUDA .*scripts/setup.sh --cuda"):
        hybrid_infer.load(LENET / "deploy.prototxt", LENET / "lenet_digits.caffemodel", device=0)
    proc = _cli("--device", "0")
    assert proc.returncode == 2 and "built without CUDA" in proc.stderr, proc.stderr
