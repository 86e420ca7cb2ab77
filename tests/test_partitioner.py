"""Partitioner properties on random DAGs built as real Caffe nets, plus hand-made cases."""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_infer.graph.layer_graph import LayerGraph
from hybrid_infer.model.caffe_model import CaffeModel
from hybrid_infer.partition.capability import Capability
from hybrid_infer.partition.partitioner import CAFFE, TENSORRT, partition

from partition_checks import check_partition_invariants

HEADER = 'name: "random"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }\n'


@st.composite
def random_nets(draw):
    """A random DAG of ReLU/TanH (one bottom, sometimes in place) and Eltwise SUM (two bottoms),
    some layers forced to Caffe, plus a minimum segment size.

    Like Caffe, only a blob version nobody has read yet may be rewritten in place.
    """
    n = draw(st.integers(2, 18))
    blobs = ["data"]
    consumed = {"data"}
    lines = []
    names = []
    for i in range(n):
        name = f"l{i}"
        if len(blobs) > 1 and draw(st.booleans()):
            a, b = draw(st.lists(st.sampled_from(blobs), min_size=2, max_size=2, unique=True))
            lines.append(f'layer {{ name: "{name}" type: "Eltwise" bottom: "{a}" bottom: "{b}" top: "{name}" }}')
            consumed |= {a, b}
            blobs.append(name)
        else:
            bottom = draw(st.sampled_from(blobs))
            kind = draw(st.sampled_from(["ReLU", "TanH"]))
            in_place = bottom not in consumed and draw(st.booleans())
            top = bottom if in_place else name
            if not in_place:
                consumed.add(bottom)
            lines.append(f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{top}" }}')
            if not in_place:
                blobs.append(name)
        names.append(name)
    forced = draw(st.lists(st.sampled_from(names), unique=True, max_size=n))
    min_size = draw(st.integers(0, 4))
    return HEADER + "\n".join(lines) + "\n", forced, min_size


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets())
def test_random_dags(case):
    text, forced, min_size = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.prototxt"
        path.write_text(text)
        graph = LayerGraph(CaffeModel(path))
        p = partition(graph, Capability("tensorrt", forced), min_size)
        check_partition_invariants(graph, p, min_size)
        for name in forced:
            assert p.segment_of(name).backend == CAFFE
        again = partition(graph, Capability("tensorrt", forced), min_size)
        assert [(s.backend, s.layers, s.inputs, s.outputs) for s in again.segments] == \
               [(s.backend, s.layers, s.inputs, s.outputs) for s in p.segments]


def _chain_with_detour(make_prototxt):
    # a -> b -> c, with a -> x(Caffe) -> c: merging a and c through b would hide x's cycle.
    return make_prototxt(HEADER + """
layer { name: "a" type: "TanH" bottom: "data" top: "a" }
layer { name: "x" type: "ReLU" bottom: "a" top: "x" }
layer { name: "b" type: "TanH" bottom: "a" top: "b" }
layer { name: "c" type: "Eltwise" bottom: "b" bottom: "x" top: "c" }
layer { name: "d" type: "TanH" bottom: "c" top: "d" }
""")


def test_branch_through_caffe_splits_tensorrt_region(make_prototxt):
    graph = LayerGraph(CaffeModel(_chain_with_detour(make_prototxt)))
    p = partition(graph, Capability("tensorrt", ["x"]), min_segment_size=1)
    check_partition_invariants(graph, p, 1)
    assert [s.backend for s in p.segments] == [TENSORRT, CAFFE, TENSORRT]
    assert p.segments[0].layers == ["a", "b"]
    assert p.segments[2].layers == ["c", "d"]
    assert p.segments[0].outputs == ["a", "b"]


def test_small_segments_go_to_caffe_with_reason(make_prototxt):
    graph = LayerGraph(CaffeModel(_chain_with_detour(make_prototxt)))
    p = partition(graph, Capability("tensorrt", ["x"]), min_segment_size=3)
    assert [s.backend for s in p.segments] == [CAFFE]
    assert "below --min-segment-size 3" in p.fallback_reasons["a"]
    assert p.fallback_reasons["x"] == "forced to Caffe by --fallback x"


def test_in_place_values_are_distinct(make_prototxt):
    graph = LayerGraph(CaffeModel(make_prototxt(HEADER + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "sig" type: "Sigmoid" bottom: "conv" top: "conv" }
""")))
    assert graph.layers["relu"].bottoms == ("conv",)
    assert graph.layers["relu"].tops == ("conv@relu",)
    assert graph.layers["sig"].bottoms == ("conv@relu",)
    assert graph.value_of_blob("conv") == "conv@sig"
    assert graph.outputs == ["conv@sig"]
