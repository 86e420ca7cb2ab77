"""Every third-party prototxt in ../shared/models partitions (both profiles) or fails clearly."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hybrid_infer.errors import ModelError
from hybrid_infer.graph.layer_graph import LayerGraph
from hybrid_infer.model.caffe_model import CaffeModel
from hybrid_infer.partition.capability import PROFILES, Capability
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT, partition
from hybrid_infer.report.partition_report import FORMATS, to_json

from conftest import SHARED_MODELS
from partition_checks import check_partition_invariants

# Files this Caffe (brocolli-caffe 9.0.2) cannot load, and the part of the error users see.
EXPECTED_ERRORS = {
    "opencv_dnn_layers/layer_interp.prototxt": r"layer_interp.prototxt:14: .*no field named \"interp_param\"",
    "opencv_dnn_layers/net_roi_pooling.prototxt": r"net_roi_pooling.prototxt:41: .*roi_pooling_param",
    "opencv_dnn_layers/net_faster_rcnn_proposal.prototxt": r"Input layer 'rpn_cls_prob_reshape' gives no shape",
    "opencv_dnn_layers/reshape_and_slice_routines.prototxt": r"Input layer 'input' gives no shape for 'input'",
}

PROTOTXTS = sorted(str(p.relative_to(SHARED_MODELS)) for p in SHARED_MODELS.glob("**/*.prototxt")) \
    if SHARED_MODELS.is_dir() else ["(shared models absent)"]


@pytest.mark.parametrize("relpath", PROTOTXTS)
def test_partition_every_shared_prototxt(shared_models, relpath):
    path = shared_models / relpath
    if relpath in EXPECTED_ERRORS:
        with pytest.raises(ModelError, match=EXPECTED_ERRORS[relpath]):
            CaffeModel(path)
        return
    graph = LayerGraph(CaffeModel(path))
    for profile in PROFILES:
        for min_size in (1, 3):
            p = partition(graph, Capability(profile), min_size)
            check_partition_invariants(graph, p, min_size)
            for fmt in ("text", "json", "dot"):
                assert FORMATS[fmt](p)
            data = to_json(p)
            for name, reason in data["fallback_reasons"].items():
                assert p.segment_of(name).backend == CAFFE and reason


@pytest.mark.parametrize("relpath", ["mobilenet_ssd/MobileNetSSD_deploy.prototxt",
                                     "hyperlpr_mininet_ssd/mininet_ssd_v1.prototxt"])
def test_ssd_nets_are_one_tensorrt_segment(shared_models, relpath):
    """PriorBox folds to constants and DetectionOutput is lowered: the whole SSD is one segment.
    Forced to Caffe, DetectionOutput alone is the Caffe segment (the layout before both lowerings
    was TensorRT | Caffe with PriorBox, Concat and DetectionOutput in Caffe)."""
    ssd = LayerGraph(CaffeModel(shared_models / relpath))
    assert [s.backend for s in partition(ssd, Capability("tensorrt")).segments] == [TENSORRT]
    p = partition(ssd, Capability("tensorrt", fallback=["DetectionOutput"]))
    assert [s.backend for s in p.segments] == [TENSORRT, CAFFE]
    assert {ssd.layers[n].type for n in p.segments[1].layers} == {"DetectionOutput"}


def test_known_partitions(shared_models):
    """Hand-checked facts: plain CNNs are one TensorRT segment."""
    googlenet = LayerGraph(CaffeModel(shared_models / "bvlc_googlenet/deploy.prototxt"))
    assert [s.backend for s in partition(googlenet, Capability("tensorrt")).segments] == [TENSORRT]
    old = partition(googlenet, Capability("tensorrt-2"))
    assert all(googlenet.layers[n].type in ("Concat", "Dropout") or "min-segment-size" in old.fallback_reasons[n]
               for s in old.segments if s.backend == CAFFE for n in s.layers)


def test_cli_partition_formats(shared_models, tmp_path):
    model = shared_models / "bvlc_googlenet/deploy.prototxt"
    run = lambda *a: subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "partition", str(model), *a],
                                    capture_output=True, text=True, check=True)
    text = run("--profile", "tensorrt-2").stdout
    assert "coverage" in text and "boundary tensors" in text and "layers in Caffe and why" in text
    data = json.loads(run("--format", "json", "--fallback", "LRN").stdout)
    assert {"segments", "fallback_reasons"} <= data.keys()
    assert all({"id", "backend", "layers", "inputs", "outputs"} <= s.keys() for s in data["segments"])
    assert data["fallback_reasons"]["pool1/norm1"] == "forced to Caffe by --fallback LRN"
    svg = tmp_path / "googlenet.svg"
    run("--format", "svg", "--profile", "tensorrt-2", "-o", str(svg))
    assert svg.read_text().lstrip().startswith("<?xml") and "segment 0" in svg.read_text()
    failed = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "partition", str(model),
                             "--profile", "tensorrt-2", "--require-full"], capture_output=True, text=True)
    assert failed.returncode == 2 and "would run in Caffe" in failed.stderr
