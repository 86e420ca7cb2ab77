"""Whole models: the hybrid (each CPU engine, ONNX Runtime and OpenVINO, + pycaffe) against
pure Caffe, within 1e-4.

Real weights where the model ships them, random weights with a fixed seed otherwise. For
classifiers the pre-softmax blob is compared too: softmax of random logits saturates and
would hide errors. A model is loaded once for all engines (``_model``): loading dominates.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.api import HybridNet
from hybrid_infer.inputs import Preprocessing, load_input
from hybrid_infer.metrics import relative_l2
from hybrid_infer.model.caffe_model import CaffeModel
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT

from conftest import CONFORMANCE_ENGINES, GRAPHS

TOLERANCE = 1e-4


def _outputs_with_logits(prototxt: Path, **kwargs) -> list[str]:
    return hybrid_infer.load(prototxt, **kwargs).outputs_with_logits()


@functools.lru_cache(maxsize=1)
def _model(prototxt: Path, weights: Optional[Path] = None, random_weights: Optional[int] = None,
           input_shapes: tuple = ()) -> CaffeModel:
    """The loaded model, kept while the tests of one model run with each engine."""
    model = CaffeModel(prototxt, weights, dict(input_shapes))
    if random_weights is not None:
        model.set_random_weights(random_weights)
    return model


def _hybrid(prototxt: Path, engine: str, weights: Optional[Path] = None, *, random_weights: Optional[int] = None,
            input_shapes: tuple = (), **options) -> HybridNet:
    return HybridNet(_model(prototxt, weights, random_weights, input_shapes), engine=engine, **options)


def assert_matches_caffe(net, inputs: dict[str, np.ndarray]) -> dict[str, float]:
    got, want = net.run(inputs), net.run_caffe(inputs)
    errors = {blob: relative_l2(got[blob], want[blob]) for blob in want}
    assert all(e <= TOLERANCE for e in errors.values()), errors
    for se in net.segment_engines:
        assert se.fallback_note is None, se.fallback_note
    return errors


def _random_inputs(net, batch: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng()
    return {name: rng.standard_normal(((batch or shape[0]), *shape[1:])).astype(np.float32)
            for name, shape in net.input_shapes().items()}


RANDOM_WEIGHT_MODELS = [
    "bvlc_googlenet/deploy.prototxt",
    "bvlc_alexnet/deploy.prototxt",
    "bvlc_caffenet/deploy.prototxt",
    "resnet_50/ResNet-50-deploy.prototxt",
    "squeezenet_v1.1/deploy.prototxt",
    "mobilenet_v1/mobilenet_deploy.prototxt",
    "cifar10_full/cifar10_full.bvlc_master.prototxt",
]


@pytest.mark.parametrize("engine", CONFORMANCE_ENGINES, indirect=True)  # engines inner: a model loads once
@pytest.mark.parametrize("relpath", RANDOM_WEIGHT_MODELS)
def test_random_weight_models(shared_models, relpath, engine):
    path = shared_models / relpath
    blobs = _outputs_with_logits(path)
    net = _hybrid(path, engine, random_weights=2026, outputs=blobs)
    assert [s.backend for s in net.partition.segments] == [TENSORRT]
    inputs = _random_inputs(net, batch=1)
    errors = assert_matches_caffe(net, inputs)
    print(relpath, errors)


TRAINED = [
    ("cifar10_full/cifar10_full.prototxt", "cifar10_full/cifar10_full_iter_70000.caffemodel"),
    ("fsrcnn/FSRCNN_mat.prototxt", "fsrcnn/snapshot_iter_2546000.caffemodel"),
    ("mtcnn/det1.prototxt", "mtcnn/det1.caffemodel"),
    ("mtcnn/det2.prototxt", "mtcnn/det2.caffemodel"),
    ("mtcnn/det3.prototxt", "mtcnn/det3.caffemodel"),
    ("mtcnn/det4.prototxt", "mtcnn/det4.caffemodel"),
]


@pytest.mark.parametrize("engine", CONFORMANCE_ENGINES, indirect=True)
@pytest.mark.parametrize("prototxt,weights", TRAINED)
def test_trained_models(shared_models, prototxt, weights, engine):
    blobs = _outputs_with_logits(shared_models / prototxt)
    net = _hybrid(shared_models / prototxt, engine, shared_models / weights, outputs=blobs)
    errors = assert_matches_caffe(net, _random_inputs(net))
    print(prototxt, errors)


def test_lenet_mnist_classifies_its_samples(shared_models, engine):
    folder = shared_models / "lenet_mnist"
    net = _hybrid(folder / "mnist_deploy.prototxt", engine, folder / "lenet_iter_10000.caffemodel")
    samples = sorted((folder / "samples").glob("img_*.png"))
    assert len(samples) == 10
    shape = net.input_shapes()["data"]
    batch = np.concatenate([load_input(p, shape, Preprocessing(scale=1 / 256)) for p in samples])
    labels = [int(p.stem.split("_")[1]) for p in samples]
    assert_matches_caffe(net, {"data": batch})
    predicted = np.argmax(net.run({"data": batch})["loss"].reshape(10, -1), axis=1)
    assert predicted.tolist() == labels


def test_bundled_lenet_digits_classifies_its_samples(engine):
    folder = GRAPHS / "lenet_digits"
    net = _hybrid(folder / "deploy.prototxt", engine, folder / "lenet_digits.caffemodel", outputs=["prob", "ip2"])
    for suffix, prep in ((".npy", Preprocessing()), (".png", Preprocessing(scale=1 / 255))):
        samples = sorted((folder / "samples").glob(f"digit_*{suffix}"))
        batch = np.concatenate([load_input(p, (1, 1, 16, 16), prep) for p in samples])
        labels = [int(p.stem.split("_")[1]) for p in samples]
        assert_matches_caffe(net, {"data": batch})
        assert np.argmax(net.run({"data": batch})["prob"], axis=1).tolist() == labels


def assert_same_detections(got: np.ndarray, want: np.ndarray) -> None:
    """Caffe's DetectionOutput rows, in Caffe's order, each value within 1e-4."""
    assert got.shape == want.shape, f"{got.shape[2]} detections, Caffe {want.shape[2]}"
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


def test_hyperlpr_ssd_detects_like_caffe(shared_models, engine):
    # HyperLPR feeds the photo at its own size, RGB, ImageNet mean and (about) std; the
    # priors PriorBox folds are those of that size, not of the prototxt's 512 x 512.
    folder = shared_models / "hyperlpr_mininet_ssd"
    net = _hybrid(folder / "mininet_ssd_v1.prototxt", engine, folder / "mininet_ssd_v1.caffemodel",
                  input_shapes=(("data", (1, 3, 720, 1280)),))
    assert [s.backend for s in net.partition.segments] == [TENSORRT]
    image = load_input(folder / "images/test.jpg", (1, 3, 720, 1280),
                       Preprocessing(scale=1 / (255 * 0.226), mean=(123.7, 116.3, 103.5), channel_order="rgb"))
    for batch in (image, np.concatenate([image, image[:, :, ::-1]])):  # and upside down, as a second image
        got, want = net.run({"data": batch})["detection_out"], net.run_caffe({"data": batch})["detection_out"]
        assert_same_detections(got, want)
        plates = want[0, 0][want[0, 0, :, 2] > 0.5]
        assert len(plates) >= 1 and set(plates[:, 0]) <= {0.0, 1.0}, "the sample photo's plate should be detected"


@pytest.mark.parametrize("batch", [1, 3])
def test_mobilenet_ssd_random_weights(shared_models, engine, batch):
    path = shared_models / "mobilenet_ssd/MobileNetSSD_deploy.prototxt"
    net = _hybrid(path, engine, random_weights=11,
                  outputs=["detection_out", "mbox_conf_flatten", "mbox_loc", "mbox_priorbox"])
    assert [s.backend for s in net.partition.segments] == [TENSORRT]
    inputs = _random_inputs(net, batch)
    got, want = net.run(inputs), net.run_caffe(inputs)
    assert_same_detections(got["detection_out"], want["detection_out"])
    assert got["detection_out"].shape[2] > batch, "random weights should still give detections"
    assert np.array_equal(got["mbox_priorbox"], want["mbox_priorbox"])
    for blob in ("mbox_conf_flatten", "mbox_loc"):
        assert relative_l2(got[blob], want[blob]) <= TOLERANCE


@pytest.mark.parametrize("graph", ["python_layer_net/deploy.prototxt",
                                   "python_layer_positions/python_layer_start.prototxt",
                                   "python_layer_positions/python_layer_branch.prototxt",
                                   "python_layer_positions/python_layer_end.prototxt"])
def test_python_layer_graphs(monkeypatch, graph, engine):
    monkeypatch.syspath_prepend(str(GRAPHS / "python_layers"))
    path = GRAPHS / graph
    net = _hybrid(path, engine, random_weights=5, min_segment_size=1, outputs=_outputs_with_logits(path))
    assert {s.backend for s in net.partition.segments} == {TENSORRT, CAFFE}
    assert_matches_caffe(net, _random_inputs(net))
    assert_matches_caffe(net, _random_inputs(net, batch=3))
