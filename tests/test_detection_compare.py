"""DetectionOutput blobs compared as detections: the comparison itself on rows written by
hand, on two real Caffe runs that a near-tie splits, and in `run --check`, `compare` and
`diff` on MobileNet-SSD."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hybrid_infer.cli.main import main
from hybrid_infer.detections import NEAR_TIE, REAL, Thresholds, compare_detections, detection_outputs, parse
from hybrid_infer.metrics import compare_outputs
from hybrid_infer.testing import load_text, net

THRESHOLDS = Thresholds(confidence=0.3, nms=0.45)


def blob(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32).reshape(1, 1, -1, 7)


A = [0, 1, 0.9, 0.10, 0.10, 0.30, 0.30]
B = [0, 1, 0.6, 0.50, 0.50, 0.70, 0.70]
C = [0, 2, 0.5, 0.20, 0.60, 0.40, 0.90]


def kinds(found) -> list[tuple[str, str]]:
    return sorted((d.kind, d.cause) for d in found.diffs)


def test_identical_rows_have_no_differences():
    found = compare_detections(blob(A, B, C), blob(A, B, C), THRESHOLDS, 1e-4)
    assert found.ok and not found.diffs and (found.expected, found.actual, found.matched) == (3, 3, 3)
    assert "same rows in the same order" in found.summary()


def test_placeholder_rows_are_no_detections():
    empty = blob([0, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1])
    assert parse(empty) == []
    found = compare_detections(empty, empty, THRESHOLDS, 1e-4)
    assert found.ok and found.matched == 0
    assert kinds(compare_detections(empty, blob(A), THRESHOLDS, 1e-4)) == [("missing", REAL)]


def test_score_at_the_confidence_threshold_is_a_near_tie():
    at_threshold = [0, 2, 0.30001, 0.6, 0.1, 0.8, 0.2]
    found = compare_detections(blob(A), blob(A, at_threshold), THRESHOLDS, 1e-4)
    assert kinds(found) == [("missing", NEAR_TIE)] and found.ok
    assert "confidence_threshold" in found.diffs[0].why


def test_equal_scores_swapped_at_a_cut_are_near_ties():
    kept_by_caffe = [0, 1, 0.6, 0.50, 0.50, 0.70, 0.70]
    kept_by_hybrid = [0, 2, 0.6000001, 0.05, 0.60, 0.25, 0.95]
    found = compare_detections(blob(A, kept_by_hybrid), blob(A, kept_by_caffe), THRESHOLDS, 1e-4)
    assert kinds(found) == [("extra", NEAR_TIE), ("missing", NEAR_TIE)] and found.ok


def test_overlap_at_the_nms_threshold_and_its_knock_on_are_near_ties():
    # `borderline` overlaps `kept` by exactly the NMS threshold: Caffe keeps it, the hybrid
    # (rounding the other way) drops it. `shadow` overlaps `borderline` by 0.4, above the
    # threshold: suppressed in Caffe, kept in the hybrid, a knock-on of the same near-tie.
    kept = [0, 1, 0.9, 0.0, 0.0, 0.45, 1.0]
    borderline = [0, 1, 0.8, 0.2, 0.0, 0.82, 1.0]   # overlaps `kept` by 0.25 / (0.45 + 0.62 - 0.25)
    shadow = [0, 1, 0.7, 0.5, 0.0, 1.0, 1.0]
    caffe_iou = 0.25 / (0.45 + 0.62 - 0.25)
    thresholds = Thresholds(confidence=None, nms=caffe_iou)
    found = compare_detections(blob(kept, shadow), blob(kept, borderline), thresholds, 1e-4)
    assert found.ok, [d.describe() for d in found.diffs]
    assert {d.kind for d in found.diffs} == {"missing", "extra"}
    assert any("nms_threshold" in d.why for d in found.diffs) and any("near-tie detection" in d.why for d in found.diffs)


def test_inverted_boxes_match_themselves():
    inverted = [0, 1, 0.7, 0.5, 0.6, 0.4, 0.3]  # xmax < xmin: overlaps nothing, not even itself
    assert compare_detections(blob(A, inverted), blob(A, inverted), THRESHOLDS, 1e-4).diffs == []


def test_real_differences_are_called_real():
    lost = compare_detections(blob(A, C), blob(A, B, C), THRESHOLDS, 1e-4)
    assert kinds(lost) == [("missing", REAL)] and not lost.ok
    moved = compare_detections(blob(A, [0, 1, 0.6, 0.52, 0.50, 0.70, 0.70]), blob(A, B), THRESHOLDS, 1e-4)
    assert kinds(moved) == [("moved", REAL)] and moved.max_abs == pytest.approx(0.02, abs=1e-6)
    swapped = compare_detections(blob(B, A), blob(A, B), THRESHOLDS, 1e-4)
    assert kinds(swapped) == [("order", REAL)]
    tied = [0, 1, 0.9, 0.60, 0.05, 0.80, 0.25]
    assert kinds(compare_detections(blob(tied, A), blob(A, tied), THRESHOLDS, 1e-4)) == [("order", NEAR_TIE)]


def test_outputs_of_another_shape_are_compared_as_detections_only_when_named():
    plain = compare_outputs({"out": blob(A)}, {"out": blob(A, B)})
    assert plain[0].rel_l2 == float("inf") and not plain[0].within(1e-4)
    named = compare_outputs({"out": blob(A)}, {"out": blob(A, B)}, detections={"out": THRESHOLDS})
    assert named[0].detections is not None and not named[0].within(1e-4)


def _caffe_top(model, feed: dict[str, np.ndarray]) -> np.ndarray:
    caffe = model.reference_net()
    caffe.forward(**feed)
    return np.array(caffe.blobs["out"].data, copy=True)


def test_two_caffe_runs_split_by_a_near_tie():
    """The 7th and 8th best scores differ by 1e-6 and keep_top_k is 7: a nudge below the
    tolerance swaps which one Caffe keeps. Both blobs are Caffe's own."""
    priors = 8
    text = net('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "out" '
               'detection_output_param { num_classes: 2 nms_param { nms_threshold: 0.45 } keep_top_k: 7 '
               'confidence_threshold: 0.1 } }', loc=(1, priors * 4), conf=(1, priors * 2), prior=(1, 2, priors * 4))
    model, graph = load_text(text)
    boxes = np.array([[0.1 * i, 0.0, 0.1 * i + 0.08, 0.5] for i in range(priors)])  # disjoint
    scores = np.linspace(0.9, 0.5, priors)
    scores[7] = scores[6] - 1e-6
    conf = np.stack([1 - scores, scores], axis=1)
    feed = {"loc": np.zeros((1, priors * 4), np.float32), "conf": conf.reshape(1, -1).astype(np.float32),
            "prior": np.stack([boxes.ravel(), np.full(priors * 4, 0.1)])[None].astype(np.float32)}
    before = _caffe_top(model, feed)
    feed["conf"][0, 15] += 3e-6  # prior 7 now just above prior 6
    after = _caffe_top(model, feed)
    found = compare_detections(after, before, detection_outputs(graph)["out"], 1e-4)
    assert found.ok and {(d.kind, d.cause) for d in found.diffs} >= {("missing", NEAR_TIE), ("extra", NEAR_TIE)}
    strict = compare_detections(after, before, detection_outputs(graph)["out"], 1e-8)
    assert not strict.ok


SSD = "mobilenet_ssd/MobileNetSSD_deploy.prototxt"


def test_run_check_compares_detections(shared_models, capsys):
    status = main(["run", str(shared_models / SSD), "--random-weights", "11", "--batch", "2", "--check", "--top", "2"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "detection(s) [image, label, score, xmin, ymin, xmax, ymax]" in out
    assert "1 segment(s)" in out
    assert "matched (max abs" in out and "same rows in the same order OK" in out


def test_compare_before_and_after_as_detections(shared_models, tmp_path, capsys):
    report = tmp_path / "compare.json"
    status = main(["compare", str(shared_models / SSD), "--random-weights", "11", "--runs", "1", "--warmup", "0",
                   "--partition", "caffe", "--partition", "min=3",
                   "--partition", "min=3,fallback=DetectionOutput", "--json", str(report)])
    assert status == 0, capsys.readouterr().out
    rows = {row["spec"]: row for row in json.loads(report.read_text())["partitions"]}
    after, before = rows["profile=tensorrt,min=3"], rows["profile=tensorrt,min=3,fallback=DetectionOutput"]
    assert (after["tensorrt_segments"], after["caffe_segments"]) == (1, 0)
    assert (before["tensorrt_segments"], before["caffe_segments"]) == (1, 1)
    for row in (after, before):
        (accuracy,) = row["accuracy"]
        assert accuracy["detections"]["real"] == 0 and accuracy["detections"]["matched"] > 0
        assert not row["refused"]


def test_diff_lists_detections(shared_models, capsys):
    status = main(["diff", str(shared_models / SSD), "--random-weights", "11"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "detection_out as detections:" in out and "same rows in the same order" in out
