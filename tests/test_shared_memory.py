"""Blobs that share memory in Caffe (Split, Reshape, Flatten, single-top Slice, single-bottom
Concat, identity Permute, and the Splits Caffe inserts itself), rewritten in place through
one of them: every later reader of that memory sees the write, in its own shape. Each
topology runs through ONNX Runtime, through Caffe sub-nets (``--engine caffe``) and cut
across the views, and must match a fresh pycaffe net on the same prototxt file."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

import hybrid_infer
from hybrid_infer.analysis.layer_diff import Settings, layer_diff
from hybrid_infer.cli.main import main
from hybrid_infer.errors import ModelError
from hybrid_infer.metrics import relative_l2

from conftest import REPO
from pycaffe_reference import caffe_forward, caffe_refuses

INPUT = 'input: "data" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }\n'
CONV = 'layer { name: "conv" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 kernel_size: 1 } }\n'


def _layer(text: str) -> str:
    return f"layer {{ {text} }}\n"


TOPOLOGIES = {
    # The reviewer's repro: an explicit Split, an in-place layer on each of its tops.
    "split": INPUT + "".join(map(_layer, [
        'name: "sp" type: "Split" bottom: "data" top: "d1" top: "d2"',
        'name: "pw" type: "Power" bottom: "d1" top: "d1" power_param { scale: 3 shift: 1 }',
        'name: "relu" type: "ReLU" bottom: "d2" top: "d2"',
        'name: "sum" type: "Eltwise" bottom: "d1" bottom: "d2" top: "s"'])),
    # Reshape and Flatten of one blob (which Caffe splits itself: two readers); ReLU in place on the Reshape's top.
    "reshape_flatten": INPUT + CONV + "".join(map(_layer, [
        'name: "rs" type: "Reshape" bottom: "c" top: "r" reshape_param { shape { dim: 0 dim: -1 } }',
        'name: "relu" type: "ReLU" bottom: "r" top: "r"',
        'name: "fl" type: "Flatten" bottom: "c" top: "f"',
        'name: "sum" type: "Eltwise" bottom: "r" bottom: "f" top: "s"'])),
    # The Flatten runs before the in-place write, its top is read after: it sees the write.
    "view_made_before_the_write": INPUT + CONV + "".join(map(_layer, [
        'name: "rs" type: "Reshape" bottom: "c" top: "r" reshape_param { shape { dim: 0 dim: -1 } }',
        'name: "fl" type: "Flatten" bottom: "c" top: "f"',
        'name: "early" type: "Power" bottom: "c" top: "e" power_param { scale: 2 }',
        'name: "relu" type: "ReLU" bottom: "r" top: "r"',
        'name: "sum" type: "Eltwise" bottom: "r" bottom: "f" top: "s"'])),
    # A chain of views (Reshape, then Flatten of it), the write two views away from readers of every shape.
    "chain": INPUT + CONV + "".join(map(_layer, [
        'name: "rs" type: "Reshape" bottom: "c" top: "r" reshape_param { shape { dim: 0 dim: 4 dim: 16 } }',
        'name: "fl" type: "Flatten" bottom: "r" top: "f"',
        'name: "pw" type: "Power" bottom: "f" top: "f" power_param { scale: 2 shift: 0.5 }',
        'name: "conv2" type: "Convolution" bottom: "c" top: "k" convolution_param { num_output: 2 kernel_size: 1 }',
        'name: "fl2" type: "Flatten" bottom: "r" top: "g"',
        'name: "sum" type: "Eltwise" bottom: "f" bottom: "g" top: "s"'])),
    # The views that share only when they change nothing: identity Permute, one-top Slice, one-bottom Concat.
    "identity_ops": INPUT + CONV + "".join(map(_layer, [
        'name: "perm" type: "Permute" bottom: "c" top: "p" permute_param { order: 0 order: 1 }',
        'name: "sl" type: "Slice" bottom: "p" top: "q" slice_param { axis: 1 }',
        'name: "cat" type: "Concat" bottom: "q" top: "k"',
        'name: "tanh" type: "TanH" bottom: "k" top: "k"',
        'name: "sum" type: "Eltwise" bottom: "c" bottom: "p" bottom: "k" top: "s"'])),
    # Two in-place layers on one top, then a Split of a Split; unread tops are net outputs.
    "chained_writes": INPUT + "".join(map(_layer, [
        'name: "sp" type: "Split" bottom: "data" top: "a" top: "b"',
        'name: "sp2" type: "Split" bottom: "a" top: "a1" top: "a2"',
        'name: "pw" type: "Power" bottom: "a2" top: "a2" power_param { scale: -2 shift: 1 }',
        'name: "relu" type: "ReLU" bottom: "a2" top: "a2"',
        'name: "sum" type: "Eltwise" bottom: "a1" bottom: "b" top: "s"'])),
}
IN_PLACE = {"split": ["pw", "relu"], "reshape_flatten": ["relu"], "view_made_before_the_write": ["relu"], "chain": ["pw"], "identity_ops": ["tanh"],
            "chained_writes": ["pw", "relu"]}


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _blobs(path) -> list[str]:
    """Every blob of the prototxt (their last writes are compared, as net.blobs holds them)."""
    names = []
    for line in path.read_text().splitlines():
        for part in line.split('top: "')[1:]:
            names.append(part.split('"')[0])
    return ["data"] + list(dict.fromkeys(names))


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
@pytest.mark.parametrize("how", ["onnxruntime", "caffe", "cut"])
def test_in_place_writes_reach_every_view_as_in_caffe(make_prototxt, topology, how):
    seed = _seed()
    path = make_prototxt(TOPOLOGIES[topology])
    blobs = _blobs(path)
    options = {"engine": "caffe"} if how == "caffe" else {"engine": "onnxruntime"}
    if how == "cut":  # the in-place layers in Caffe, the views and readers on TensorRT
        options.update(fallback=IN_PLACE[topology], min_segment_size=1)
    with hybrid_infer.load(path, random_weights=seed, outputs=blobs, **options) as net:
        assert net.graph.views(), "the topology rewrites shared memory, so the graph has views"
        for batch in (2, 3):  # the prototxt's batch and another one
            x = {"data": np.random.default_rng(seed + batch).standard_normal((batch, 3, 4, 4)).astype(np.float32)}
            got = net.run(x)
            want = caffe_forward(path, x, blobs, weights=net.model.weights)
            for blob in blobs:
                assert got[blob].shape == want[blob].shape, blob
                assert relative_l2(got[blob], want[blob]) <= 1e-5, f"{blob} (batch {batch}, seed {seed})"
            np.testing.assert_allclose(net.run_caffe(x)["s"], want["s"], rtol=1e-6, atol=1e-6)


def test_split_repro_graph_reports_and_diff(make_prototxt, capsys, tmp_path):
    """The reviewer's repro through the CLI (--check exit 0), with the views in the graph,
    the partition report and `diff`, named after the layer that wrote them."""
    seed = _seed()
    path = make_prototxt(TOPOLOGIES["split"].replace("dim: 2 dim: 3 dim: 4 dim: 4", "dim: 1 dim: 3 dim: 8 dim: 8"))
    net = hybrid_infer.load(path, random_weights=seed, engine="onnxruntime")
    graph = net.graph
    assert graph.layers["relu"].bottoms == ("d2@pw",) and graph.layers["sum"].bottoms == ("d1@relu", "d2@relu")
    assert [(v.name, v.alias_of, v.type, v.bottoms, v.tops) for v in graph.views()] == [
        ("pw (view as d2)", "pw", "Split", ("d1@pw",), ("d2@pw",)),
        ("relu (view as d1)", "relu", "Split", ("d2@relu",), ("d1@relu",)),
        ("relu (view as data)", "relu", "Split", ("d2@relu",), ("data@relu",))]
    assert graph.value_of_blob("data") == "data@relu" and graph.outputs == ["s"]
    assert graph.caffe_layer("d2@pw") == "pw"
    assert main(["run", str(path), "--random-weights", str(seed), "--check"]) == 0
    assert "s: max abs error" in capsys.readouterr().out
    assert main(["partition", str(path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {v["value"]: v["written_by"] for v in report["shared_memory_views"]} == {
        "d2@pw": "pw", "d1@relu": "relu", "data@relu": "relu"}
    assert report["coverage"]["layers"] == 4  # the model's own layers, not the views
    assert main(["partition", str(path)]) == 0
    assert "d2@pw      pw (Power)   d1@pw    pw (view as d2)" in capsys.readouterr().out
    x = {"data": np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    diff = layer_diff(net, Settings(engine="onnxruntime", fallback=("relu",), min_segment_size=1), x, 1e-5)
    assert [r.value for r in diff.rows] == ["d1", "d2", "d1@pw", "d2@pw", "d2@relu", "d1@relu", "data@relu", "s"]
    assert {r.value: r.layer for r in diff.rows}["d2@pw"] == "pw (view as d2)"
    assert diff.first_above is None


def test_output_blob_of_the_shared_source_is_caffes_last_write(make_prototxt, tmp_path):
    seed = _seed()
    path = make_prototxt(TOPOLOGIES["reshape_flatten"])
    x = {"data": np.random.default_rng(seed).standard_normal((2, 3, 4, 4)).astype(np.float32)}
    with hybrid_infer.load(path, random_weights=seed, engine="onnxruntime", outputs=["c", "r", "f"]) as net:
        want = caffe_forward(path, x, ["c", "r", "f"], weights=net.model.weights)
        got = net.run(x)
        assert net.graph.value_of_blob("c") == "c@relu"
        assert relative_l2(got["c"], want["c"]) <= 1e-5 and (want["c"] >= 0).all()  # c holds ReLU's write
        np.save(tmp_path / "x.npy", x["data"])
    assert main(["run", str(path), "--random-weights", str(seed), "--input", f"data={tmp_path / 'x.npy'}",
                 "--output-blob", "c", "--check"]) == 0


@pytest.mark.parametrize("text, layer, other", [
    # An in-place layer on a net input that an earlier layer also reads.
    (INPUT + CONV + _layer('name: "bn" type: "ReLU" bottom: "data" top: "data"'), "bn", "conv"),
    # ... on the source of an explicit Split (the Split read it first).
    (TOPOLOGIES["split"] + _layer('name: "late" type: "ReLU" bottom: "data" top: "data"'), "late", "sp"),
    # ... reading the rewritten blob twice itself.
    (INPUT + _layer('name: "twice" type: "Eltwise" bottom: "data" bottom: "data" top: "data"'), "twice", None),
])
def test_in_place_rewrite_of_a_blob_read_before_is_refused_as_caffe_does(make_prototxt, text, layer, other):
    path = make_prototxt(text)
    assert "produced by multiple sources" in caffe_refuses(path)
    clash = f"but layer '{other}' also reads that write of 'data'" if other else "and reads that write of 'data' twice"
    with pytest.raises(ModelError, match=rf"layer '{layer}' rewrites blob 'data' in place, {clash} \(Caffe refuses "
                                         rf"this: \"Top blob 'data' produced by multiple sources\"\); give '{layer}' "
                                         r"a new top"):
        hybrid_infer.load(path)
    proc = subprocess.run([sys.executable, "-m", "hybrid_infer.cli.main", "partition", str(path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_segments_with_views_build_tensorrt_engines(make_prototxt, rtx, topology):
    """The views' ONNX (Identity, Reshape with the batch kept free) passes the full ONNX check
    and TensorRT-RTX's parser and builder, with every blob a segment output."""
    from hybrid_infer.engines.tensorrt_build import BuildSettings, build_engine
    from hybrid_infer.executor.engine_factory import segment_onnx
    path = make_prototxt(TOPOLOGIES[topology])
    net = hybrid_infer.load(path, random_weights=1, outputs=_blobs(path), min_segment_size=1)
    (segment,) = net.partition.segments
    views = {v.name for v in net.graph.views()}
    assert views <= set(segment.layers)
    built = build_engine(segment_onnx(net.graph, net.model, segment, check=True), BuildSettings(batch_max=4),
                         api=rtx, label=topology)
    assert built.plan_size > 0 and sorted(built.output_names) == sorted(segment.outputs)
