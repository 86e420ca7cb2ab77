"""DetectionOutput lowered to ONNX, against real pycaffe, detection by detection.

Inputs are built to exercise what the layer decides: priors clustered so that decoded
boxes overlap (NMS suppresses), location offsets large enough to invert boxes, scores
that leave nothing above the threshold, exactly keep_top_k candidates, and scores
quantised to eighths so that many are equal. Every row must equal Caffe's, in Caffe's
order, within 1e-5 (relative for values above 1), at batch 1 and 3. The one exception is Caffe's own: where keep_top_k
sorts more than 16 detections with equal scores, Caffe uses std::sort, whose order of
equal elements (and so which of them survive the cut) is unspecified; there the rows
must be a valid tie order (checked in ``assert_tie_equivalent``).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_infer.detections import compare_detections, detection_outputs, parse
from hybrid_infer.engines.tensorrt_build import BuildSettings, build_engine
from hybrid_infer.engines.tensorrt_engine import TensorRTEngine, runtime_available
from hybrid_infer.errors import LoweringError
from hybrid_infer.lowering import nms
from hybrid_infer.lowering.detection import DETECTIONS
from hybrid_infer.testing import cpu_engine, fresh_seed, load_text, lower_whole_net, net

PRIORS, CLASSES = 24, 4
TOLERANCE = 1e-5
RUNTIME_OK, RUNTIME_REASON = runtime_available()


def detection_prototxt(params: str, share: bool = True, classes: int = CLASSES, priors: int = PRIORS) -> str:
    loc_classes = 1 if share else classes
    body = (f'layer {{ name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "out" '
            f'detection_output_param {{ num_classes: {classes} share_location: {str(share).lower()} {params} }} }}')
    return net(body, loc=(1, priors * loc_classes * 4), conf=(1, priors * classes), prior=(1, 2, priors * 4))


def clustered_priors(rng: np.random.Generator, priors: int) -> np.ndarray:
    """Boxes around three centres, so that many overlap; variances as SSD's."""
    centres = rng.uniform(0.2, 0.8, size=(3, 2))[rng.integers(0, 3, priors)] + rng.normal(0, 0.03, (priors, 2))
    sizes = rng.uniform(0.1, 0.4, size=(priors, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    return np.stack([boxes.ravel(), np.tile([0.1, 0.1, 0.2, 0.2], priors)])[None].astype(np.float32)


def grid_priors(priors: int) -> np.ndarray:
    """Disjoint boxes on a 6-wide grid: nothing overlaps, so NMS keeps every candidate."""
    cells = np.array([(i % 6, i // 6) for i in range(priors)], dtype=np.float64)
    boxes = np.concatenate([cells * 0.15 + 0.01, cells * 0.15 + 0.12], axis=1)
    return np.stack([boxes.ravel(), np.tile([0.1, 0.1, 0.2, 0.2], priors)])[None].astype(np.float32)


def make_inputs(kind: str, rng: np.random.Generator, batch: int, share: bool, classes: int = CLASSES,
                priors: int = PRIORS) -> dict[str, np.ndarray]:
    loc_width = priors * (1 if share else classes) * 4
    loc = rng.normal(0, 3.0 if kind == "inverted" else 0.5, (batch, loc_width))
    conf = rng.uniform(0, 1, (batch, priors * classes))
    prior = clustered_priors(rng, priors)
    if kind == "ties":
        conf = np.round(conf * 8) / 8
    elif kind == "quiet":  # nothing reaches a threshold of 0.95
        conf = conf * 0.9
    elif kind == "chain":  # priors in a row, each overlapping the next by IoU 0.54, scores falling along it
        x = np.arange(priors) * 0.003
        boxes = np.stack([x, np.zeros(priors), x + 0.01, np.full(priors, 0.01)], 1)
        prior = np.stack([boxes.ravel(), np.full(priors * 4, 0.1)])[None].astype(np.float32)
        loc = np.zeros_like(loc)
        falling = 1 - np.arange(priors)[None, :, None] * 1e-3 - rng.uniform(0, 1e-4, (batch, 1, classes))
        conf = np.broadcast_to(falling, (batch, priors, classes)).reshape(batch, -1)
    elif kind == "exactly_seven":  # 7 candidates per image above 0.5 (background: class 0), disjoint boxes
        prior, loc = grid_priors(priors), np.zeros_like(loc)
        conf = rng.uniform(0, 0.4, (batch, priors, classes))
        for image in range(batch):
            chosen = rng.choice(priors * (classes - 1), 7, replace=False)
            conf[image, chosen // (classes - 1), 1 + chosen % (classes - 1)] = rng.uniform(0.6, 1, 7)
        conf = conf.reshape(batch, -1)
    return {"loc": loc.astype(np.float32), "conf": conf.astype(np.float32), "prior": prior}


def run_both(prototxt: str, feeds: list[dict[str, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ONNX Runtime's top, Caffe's top) for each set of feeds."""
    model, graph = load_text(prototxt)
    engine = cpu_engine(lower_whole_net(model, graph, ["out"]))
    caffe = model.reference_net()
    results = []
    for feed in feeds:
        for name, array in feed.items():
            caffe.blobs[name].reshape(*array.shape)
        caffe.reshape()
        caffe.forward(**feed)
        results.append((engine.run(feed)["out"], np.array(caffe.blobs["out"].data, copy=True)))
    return results


def assert_same_rows(got: np.ndarray, want: np.ndarray, where: str) -> None:
    """Caffe's rows in Caffe's order, each value within 1e-5 (relative where its size is above 1:
    boxes decoded with large offsets reach thousands, where float32 spacing alone exceeds 1e-5)."""
    assert got.shape == want.shape, f"{where}: {got.shape[2]} rows, Caffe {want.shape[2]}"
    error = np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
    worst = float(error.max()) if want.size else 0.0
    assert worst <= TOLERANCE, f"{where}: rows differ from Caffe's by {worst:.3g}"


def assert_tie_equivalent(got: np.ndarray, want: np.ndarray, prototxt: str, where: str) -> None:
    """Same count, the same scores per image, and every difference from Caffe's rows one that
    equal scores explain (tie order, or which of equally scored detections the cut kept)."""
    assert got.shape == want.shape, f"{where}: {got.shape[2]} rows, Caffe {want.shape[2]}"
    for image in np.unique(want[0, 0, :, 0]):
        scores = lambda a: np.sort(a[0, 0][a[0, 0, :, 0] == image, 2])
        np.testing.assert_array_equal(scores(got), scores(want), err_msg=where)
    _, graph = load_text(prototxt)
    found = compare_detections(got, want, detection_outputs(graph)["out"], TOLERANCE)
    assert found.ok, f"{where}: {[d.describe() for d in found.real]}"


def check(params: str, kind: str = "overlapping", share: bool = True, seed: int | None = None,
          batches: tuple[int, ...] = (1, 3)) -> list[tuple[np.ndarray, np.ndarray]]:
    seed = fresh_seed(seed)
    rng = np.random.default_rng(seed)
    prototxt = detection_prototxt(params, share)
    results = run_both(prototxt, [make_inputs(kind, rng, b, share) for b in batches])
    for batch, (got, want) in zip(batches, results):
        where = f"'{params}' share_location {share}, {kind} inputs, batch {batch} (seed {seed})"
        assert_same_rows(got, want, where)
    return results


CODE_TYPES = ["CORNER", "CENTER_SIZE", "CORNER_SIZE"]
NMS = ["", "nms_param { nms_threshold: 0.45 }", "nms_param { nms_threshold: 0.3 top_k: 6 }",
       "nms_param { nms_threshold: 0.7 eta: 0.8 top_k: 12 }", "nms_param { nms_threshold: 0.45 eta: 0.5 }",
       "nms_param { nms_threshold: 0 top_k: 10 }", "nms_param { nms_threshold: 1 top_k: 3 }"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(code_type=st.sampled_from(CODE_TYPES), in_target=st.booleans(), share=st.booleans(),
       background=st.sampled_from([0, CLASSES - 1, -1]), nms=st.sampled_from(NMS),
       keep_top_k=st.sampled_from([-1, 5, 200]), threshold=st.sampled_from(["", "confidence_threshold: 0.3"]),
       kind=st.sampled_from(["overlapping", "inverted"]), seed=st.integers(0, 2**31 - 1))
def test_detection_output_sweep(code_type, in_target, share, background, nms, keep_top_k, threshold, kind, seed):
    if share and background == -1:
        share = False  # this Caffe aborts on that combination (refusal tested below)
    params = (f"code_type: {code_type} variance_encoded_in_target: {str(in_target).lower()} "
              f"background_label_id: {background} {nms} keep_top_k: {keep_top_k} {threshold}")
    check(params, kind, share, seed)


TABLE = {
    # SSD's usual settings; location per class
    "ssd": ("nms_param { nms_threshold: 0.45 top_k: 10 } keep_top_k: 12 confidence_threshold: 0.2 code_type: "
            "CENTER_SIZE", "overlapping", True),
    "ssd_per_class_loc": ("nms_param { nms_threshold: 0.45 top_k: 10 } keep_top_k: 12 confidence_threshold: 0.2 "
                          "code_type: CENTER_SIZE", "overlapping", False),
    # nothing above the threshold: one placeholder row per image
    "empty": ("nms_param { nms_threshold: 0.45 } confidence_threshold: 0.95", "quiet", True),
    "keep_top_k_0": ("nms_param { nms_threshold: 0.45 } keep_top_k: 0", "overlapping", True),
    "top_k_0": ("nms_param { nms_threshold: 0.45 top_k: 0 }", "overlapping", False),
    # exactly keep_top_k detections (7): not cut; one fewer: cut; one more: not cut
    "exactly_keep_top_k": ("nms_param { nms_threshold: 0.45 } confidence_threshold: 0.5 keep_top_k: 7",
                           "exactly_seven", True),
    "one_below": ("nms_param { nms_threshold: 0.45 } confidence_threshold: 0.5 keep_top_k: 6", "exactly_seven", True),
    "one_above": ("nms_param { nms_threshold: 0.45 } confidence_threshold: 0.5 keep_top_k: 8", "exactly_seven", False),
    # equal scores where Caffe's sorts are stable (or keep_top_k sorts at most 16): Caffe's order exactly
    "ties_nms": ("nms_param { nms_threshold: 0.45 top_k: 8 } confidence_threshold: 0.3", "ties", True),
    "ties_small_cut": ("nms_param { nms_threshold: 0.45 top_k: 2 } keep_top_k: 4", "ties", False),
    "ties_no_nms": ("code_type: CORNER", "ties", True),
    # a long dependency between NMS's decisions: each box overlaps the next (see `chain_inputs`)
    "chain": ("nms_param { nms_threshold: 0.45 } confidence_threshold: 0.01 keep_top_k: 30 code_type: CORNER",
              "chain", True),
    # top_k far above the run's candidates (few scores pass the threshold): keep_top_k's TopK
    # works on fewer candidates than its K
    "few_candidates": ("nms_param { nms_threshold: 0.45 top_k: 20 } confidence_threshold: 0.97 keep_top_k: 50",
                       "overlapping", True),
}


@pytest.mark.parametrize("params,kind,share", list(TABLE.values()), ids=list(TABLE))
def test_detection_output_cases(params, kind, share):
    results = check(params, kind, share)
    if kind == "quiet" or "top_k: 0" in params:
        for batch, (got, _) in zip((1, 3), results):
            np.testing.assert_array_equal(got[0, 0], [[i, -1, -1, -1, -1, -1, -1] for i in range(batch)])
    if kind == "exactly_seven":
        keep = int(params.split("keep_top_k: ")[1].split()[0])
        for batch, (got, _) in zip((1, 3), results):
            assert got.shape[2] == batch * min(keep, 7)


NMS_WAYS = {  # nms.py's ways, each forced: (SMALL_STEP, PAIRWISE_LIMIT, ROUNDS)
    "position_by_position": (0, 0, 8),
    "matrix_and_rounds": (1 << 30, 1 << 30, 8),
    "matrix_one_round_then_in_order": (1 << 30, 1 << 30, 1),
}


@pytest.mark.parametrize("way", list(NMS_WAYS.values()), ids=list(NMS_WAYS))
@pytest.mark.parametrize("case", ["ssd", "ssd_per_class_loc", "chain", "ties_nms", "few_candidates", "empty"])
def test_each_nms_way_gives_caffes_rows(monkeypatch, way, case):
    for name, value in zip(("SMALL_STEP", "PAIRWISE_LIMIT", "ROUNDS"), way):
        monkeypatch.setattr(nms, name, value)
    params, kind, share = TABLE[case]
    check(params, kind, share)


@pytest.mark.parametrize("way", list(NMS_WAYS.values()), ids=list(NMS_WAYS))
def test_tensorrt_rtx_builds_each_nms_way(rtx, monkeypatch, way):
    for name, value in zip(("SMALL_STEP", "PAIRWISE_LIMIT", "ROUNDS"), way):
        monkeypatch.setattr(nms, name, value)
    model, graph = load_text(detection_prototxt(RTX_BUILDS["ssd"][0]))
    built = build_engine(lower_whole_net(model, graph, ["out"]), BuildSettings(batch_max=4), api=rtx, label="det")
    assert built.plan_size > 0


def test_only_one_image_empty_gets_no_placeholder():
    rng = np.random.default_rng(fresh_seed())
    feed = make_inputs("overlapping", rng, 2, True)
    feed["conf"][1] *= 0.1  # image 1: nothing above 0.2
    ((got, want),) = run_both(detection_prototxt("nms_param { nms_threshold: 0.45 } confidence_threshold: 0.2"), [feed])
    assert_same_rows(got, want, "image 1 without detections")
    assert set(got[0, 0, :, 0]) == {0.0}


def test_only_background_class():
    prototxt = detection_prototxt("nms_param { nms_threshold: 0.45 }", classes=1)
    rng = np.random.default_rng(fresh_seed())
    results = run_both(prototxt, [make_inputs("overlapping", rng, b, True, classes=1) for b in (1, 2)])
    for batch, (got, want) in zip((1, 2), results):
        assert_same_rows(got, want, f"only the background class, batch {batch}")


def test_ties_cut_by_keep_top_k_are_a_valid_tie_order():
    """More than 16 detections with equal scores at the keep_top_k cut: Caffe's std::sort
    order of equal elements is unspecified, so only the tie-independent facts must hold.
    Locations per class: with shared ones, two classes of one prior tied at the cut would
    differ in the label only, which the comparison (rightly, from rows alone) calls real."""
    params = "nms_param { nms_threshold: 0.45 top_k: 10 } keep_top_k: 12"
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    prototxt = detection_prototxt(params, False)
    for batch, (got, want) in zip((1, 3), run_both(prototxt, [make_inputs("ties", rng, b, False) for b in (1, 3)])):
        assert_tie_equivalent(got, want, prototxt, f"ties cut by keep_top_k, batch {batch} (seed {seed})")


@pytest.mark.parametrize("params,share,classes,priors,batch,reason", [
    ("visualize: true", True, CLASSES, 800, 1, "visualize"),
    ("background_label_id: -1", True, CLASSES, 800, 1, "abort"),
    # TensorRT's TopK takes K <= 3840, whatever the input size
    ("nms_param { nms_threshold: 0.45 top_k: 3841 }", True, 2, 4000, 1, "nms_param.top_k is 3841: TensorRT's TopK"),
    ("nms_param { nms_threshold: 0.45 top_k: 400 } keep_top_k: 3841", True, 11, 800, 1, "keep_top_k is 3841"),
    ("keep_top_k: 10", True, 2, 4000, 1, "number of priors"),
    # NMS's worst case counts the batch: 64 x 29 classes x 800^2 overlap tests
    ("nms_param { nms_threshold: 0.45 }", True, 30, 800, 64, "overlap tests per run"),
])
def test_refusals_name_the_reason(params, share, classes, priors, batch, reason):
    prototxt = detection_prototxt(params, share, classes=classes, priors=priors)
    model, graph = load_text(prototxt.replace("dim: 1 ", f"dim: {batch} "))
    with pytest.raises(LoweringError, match=reason):
        lower_whole_net(model, graph, ["out"])


def test_limits_that_are_not_reached_lower():
    """top_k and keep_top_k at TensorRT's 3840; the same overlap tests at batch 1."""
    for params, classes, priors in (("nms_param { nms_threshold: 0.45 top_k: 3840 } keep_top_k: 3840", 2, 4000),
                                    ("nms_param { nms_threshold: 0.45 }", 30, 800)):
        model, graph = load_text(detection_prototxt(params, True, classes=classes, priors=priors))
        assert lower_whole_net(model, graph, ["out"]).graph.node


def test_top_is_declared_data_dependent():
    model, graph = load_text(detection_prototxt("nms_param { nms_threshold: 0.45 }"))
    onnx_model = lower_whole_net(model, graph, ["out"])
    dims = onnx_model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [1, 1, DETECTIONS, 7]
    assert not {n.op_type for n in onnx_model.graph.node} & {"NonZero", "NonMaxSuppression"}


RTX_BUILDS = {
    "ssd": ("nms_param { nms_threshold: 0.45 top_k: 10 } keep_top_k: 12 confidence_threshold: 0.2 "
            "code_type: CENTER_SIZE", True),
    "adaptive_per_class_loc": ("nms_param { nms_threshold: 0.7 eta: 0.8 top_k: 12 } code_type: CORNER_SIZE", False),
    "no_nms_keep_top_k": ("keep_top_k: 9 variance_encoded_in_target: true", True),
    "empty_by_construction": ("nms_param { nms_threshold: 0.45 } keep_top_k: 0", True),
}


@pytest.mark.parametrize("params,share", list(RTX_BUILDS.values()), ids=list(RTX_BUILDS))
def test_tensorrt_rtx_builds_the_lowering(rtx, params, share):
    model, graph = load_text(detection_prototxt(params, share))
    built = build_engine(lower_whole_net(model, graph, ["out"]), BuildSettings(batch_max=8), api=rtx, label="det")
    assert built.plan_size > 0 and built.output_names == ["out"]
    assert any("det" in layer["caffe_layers"] for layer in built.network_layers)


def test_tensorrt_rtx_builds_the_lowering_in_fp16(rtx):
    """FP16 converts the casts inside the NMS Loop's body too (its MatMul needs equal types)."""
    model, graph = load_text(detection_prototxt(RTX_BUILDS["ssd"][0]))
    built = build_engine(lower_whole_net(model, graph, ["out"]), BuildSettings(fp16=True, batch_max=2), api=rtx,
                         label="det")
    assert built.plan_size > 0 and built.fp16_onnx


@pytest.mark.gpu
@pytest.mark.skipif(not RUNTIME_OK, reason=RUNTIME_REASON)
@pytest.mark.parametrize("params,share", list(RTX_BUILDS.values()), ids=list(RTX_BUILDS))
def test_tensorrt_engine_returns_caffes_rows(params, share):
    prototxt = detection_prototxt(params, share)
    model, graph = load_text(prototxt)
    engine = TensorRTEngine(build_engine(lower_whole_net(model, graph, ["out"]), BuildSettings(batch_max=4)).plan)
    rng = np.random.default_rng(fresh_seed())
    feeds = [make_inputs("overlapping", rng, b, share) for b in (1, 3)]
    try:
        for feed, (_, want) in zip(feeds, run_both(prototxt, feeds)):
            got = engine.run(feed)["out"]
            found = compare_detections(got, want, detection_outputs(graph)["out"], TOLERANCE)
            assert found.ok and len(parse(got)) == len(parse(want)), found.summary()
    finally:
        engine.close()
