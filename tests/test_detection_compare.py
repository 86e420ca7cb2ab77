"""DetectionOutput blobs compared as detections.

The comparison itself on rows written by hand (each legitimate near-tie Caffe's rules allow,
and adversarial rows that only look like one: every one of those must be real), on real
Caffe runs that a near-tie splits, on a 38,340-row blob, and through `run --check`,
`compare` and `diff` on MobileNet-SSD, with the real lowering and with deliberately wrong
ones (labels shifted, boxes moved), which must fail all three.
"""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from hybrid_infer.api import load
from hybrid_infer.cli.main import main
from hybrid_infer.detections import NEAR_TIE, REAL, Thresholds, compare_detections, detection_outputs, parse
from hybrid_infer.lowering.registry import REGISTRY
from hybrid_infer.metrics import compare_outputs
from hybrid_infer.testing import load_text, net

THRESHOLDS = Thresholds(confidence=0.3, nms=0.45)
#: Every cut in force: the most a near-tie may excuse.
ALL_CUTS = Thresholds(confidence=0.25, nms=0.45, top_k=100, keep_top_k=200)


def blob(*rows) -> np.ndarray:
    return np.array(rows, dtype=np.float32).reshape(1, 1, -1, 7)


def placeholders(images: int) -> np.ndarray:
    return blob(*([i, -1, -1, -1, -1, -1, -1] for i in range(images)))


A = [0, 1, 0.9, 0.10, 0.10, 0.30, 0.30]
B = [0, 1, 0.6, 0.50, 0.50, 0.70, 0.70]
C = [0, 2, 0.5, 0.20, 0.60, 0.40, 0.90]


def kinds(found) -> list[tuple[str, str]]:
    return sorted((d.kind, d.cause) for d in found.diffs)


def test_identical_rows_have_no_differences():
    found = compare_detections(blob(A, B, C), blob(A, B, C), THRESHOLDS, 1e-4)
    assert found.ok and not found.diffs and (found.expected, found.actual, found.matched) == (3, 3, 3)
    assert "same rows in the same order" in found.summary()


def test_tolerance_is_relative_for_large_values():
    huge = [0, 1, 0.9, -3.0e6, -2.0e6, 4.0e6, 5.0e6]  # boxes decoded with large offsets
    near = [0, 1, 0.9, -3.0e6 + 200, -2.0e6, 4.0e6 - 300, 5.0e6]
    assert compare_detections(blob(near), blob(huge), THRESHOLDS, 1e-4).ok
    far = [0, 1, 0.9, -3.0e6 + 2000, -2.0e6, 4.0e6, 5.0e6]
    assert not compare_detections(blob(far), blob(huge), THRESHOLDS, 1e-4).ok
    small = [0, 1, 0.9, 0.10 + 2e-4, 0.10, 0.30, 0.30]  # absolute below 1
    assert not compare_detections(blob(small), blob(A), THRESHOLDS, 1e-4).ok


def test_same_infinities_match_and_nan_or_inf_on_one_side_is_real():
    infinite = [0, 1, 0.9, -np.inf, 0.1, np.inf, 0.3]
    same = compare_detections(blob(infinite), blob(infinite), THRESHOLDS, 1e-4)
    assert same.ok and same.matched == 1
    for column, value in ((2, np.nan), (3, np.nan), (5, np.inf), (2, np.inf)):
        row = list(A)
        row[column] = value
        found = compare_detections(blob(row, B), blob(A, B), THRESHOLDS, 1e-4)
        assert not found.ok and found.nonfinite >= 1 and found.rel_l2 == found.max_abs == float("inf"), (column, value)
        assert any("NaN or Inf" in d.why for d in found.real)
    # a NaN score at the confidence threshold or tied with anything explains nothing either
    nan_row = [0, 1, np.nan, 0.6, 0.6, 0.8, 0.8]
    assert not compare_detections(blob(A, nan_row), blob(A), ALL_CUTS, 1e-4).ok


@pytest.mark.parametrize("hybrid,caffe", [
    (placeholders(1), placeholders(2)),                                    # one placeholder for two images
    (np.zeros((1, 1, 0, 7), np.float32), placeholders(1)),                 # no rows at all
    (blob([3, -1, -1, -1, -1, -1, -1]), placeholders(1)),                  # wrong image id
    (blob([0, -1, 0, 0, 0, 0, 0]), placeholders(1)),                       # garbage values
    (blob([0, 0, 0, 0, 0, 0, 0]), placeholders(1)),                        # zeros for -1
    (blob(A, [0, -1, -1, -1, -1, -1, -1]), blob(A)),                       # a placeholder among detections
    (placeholders(1), blob(A)),                                            # nothing found, Caffe found A
    (blob(A), placeholders(1)),                                            # Caffe found nothing
], ids=["count", "empty", "image", "garbage", "zeros", "mixed", "lost", "invented"])
def test_placeholder_rows_are_compared(hybrid, caffe):
    found = compare_detections(hybrid, caffe, THRESHOLDS, 1e-4)
    assert not found.ok and found.real, found.summary()
    assert compare_detections(placeholders(2), placeholders(2), THRESHOLDS, 1e-4).ok


def test_nothing_found_against_a_detection_at_the_threshold():
    at_threshold = [0, 2, 0.30001, 0.6, 0.1, 0.8, 0.2]
    found = compare_detections(blob(at_threshold), placeholders(1), THRESHOLDS, 1e-4)
    assert found.ok and kinds(found) == [("extra", NEAR_TIE), ("placeholder", NEAR_TIE)]
    assert compare_detections(placeholders(1), blob(at_threshold), THRESHOLDS, 1e-4).ok


def test_score_at_the_confidence_threshold_is_a_near_tie():
    at_threshold = [0, 2, 0.30001, 0.6, 0.1, 0.8, 0.2]
    found = compare_detections(blob(A), blob(A, at_threshold), THRESHOLDS, 1e-4)
    assert kinds(found) == [("missing", NEAR_TIE)] and found.ok
    assert "confidence_threshold" in found.diffs[0].why
    no_threshold = Thresholds(confidence=None, nms=0.45)
    assert not compare_detections(blob(A), blob(A, at_threshold), no_threshold, 1e-4).ok


def test_tie_at_the_keep_top_k_cut():
    """keep_top_k 2: both sides keep two rows; the second is one of two tied detections."""
    kept_by_caffe = [0, 1, 0.6, 0.50, 0.50, 0.70, 0.70]
    kept_by_hybrid = [0, 2, 0.6000001, 0.05, 0.60, 0.25, 0.95]
    cut = Thresholds(confidence=0.3, nms=0.45, keep_top_k=2)
    found = compare_detections(blob(A, kept_by_hybrid), blob(A, kept_by_caffe), cut, 1e-4)
    assert kinds(found) == [("extra", NEAR_TIE), ("missing", NEAR_TIE)] and found.ok
    assert all("keep_top_k" in d.why for d in found.diffs)
    # the same rows where keep_top_k does not cut (not set, or more room) are real
    assert not compare_detections(blob(A, kept_by_hybrid), blob(A, kept_by_caffe), THRESHOLDS, 1e-4).ok
    roomy = Thresholds(confidence=0.3, nms=0.45, keep_top_k=3)
    assert not compare_detections(blob(A, kept_by_hybrid), blob(A, kept_by_caffe), roomy, 1e-4).ok
    # not tied: the higher score must win the cut
    lower = [0, 2, 0.55, 0.05, 0.60, 0.25, 0.95]
    assert not compare_detections(blob(A, lower), blob(A, kept_by_caffe), cut, 1e-4).ok
    # two classes of one prior (share_location: one box) tied at the cut could legitimately
    # swap, but the rows cannot tell that from a wrong label: a changed label is real
    same_box = [0, 2, 0.6, 0.50, 0.50, 0.70, 0.70]
    assert kinds(compare_detections(blob(A, same_box), blob(A, kept_by_caffe), cut, 1e-4)) == [("label", REAL)]


def test_overlap_at_the_nms_threshold_and_its_knock_ons():
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
    assert any("NMS threshold" in d.why for d in found.diffs) and any("knock-on" in d.why for d in found.diffs)
    # the same rows without the near-tie (threshold far from the overlap) are real
    assert not compare_detections(blob(kept, shadow), blob(kept, borderline), Thresholds(None, 0.6), 1e-4).ok
    # a knock-on needs a near-tie: a shadow freed by nothing is real
    assert not compare_detections(blob(kept, borderline, shadow), blob(kept, borderline), thresholds, 1e-4).ok


def test_keep_top_k_knock_on_of_a_near_tie():
    """The hybrid keeps `borderline` (an NMS near-tie); with keep_top_k 2 that pushes Caffe's
    lowest row out of its cut: a knock-on. Without the near-tie the same push is real."""
    kept = [0, 1, 0.9, 0.0, 0.0, 0.45, 1.0]
    borderline = [0, 1, 0.8, 0.2, 0.0, 0.82, 1.0]
    lowest = [0, 2, 0.4, 0.0, 0.0, 0.1, 0.1]
    iou = 0.25 / (0.45 + 0.62 - 0.25)
    cut = Thresholds(confidence=None, nms=iou, keep_top_k=2)
    found = compare_detections(blob(kept, borderline), blob(kept, lowest), cut, 1e-4)
    assert found.ok and any("keep_top_k" in d.why for d in found.diffs), [d.describe() for d in found.diffs]
    garbage = [0, 1, 0.8, 0.6, 0.6, 0.7, 0.7]
    assert not compare_detections(blob(kept, garbage), blob(kept, lowest), cut, 1e-4).ok


def test_tied_boxes_that_suppress_each_other():
    """Two boxes of one class with tied scores that overlap above the NMS threshold: NMS
    keeps the one it visits first. Overlapping at least MATCH_IOU they are one detection
    whose box moved, which is real."""
    first = [0, 1, 0.7, 0.0, 0.0, 0.5, 1.0]
    second = [0, 1, 0.7, 0.17, 0.0, 0.67, 1.0]   # IoU 0.33 / 0.67 = 0.49: between 0.45 and MATCH_IOU
    found = compare_detections(blob(A, second), blob(A, first), Thresholds(None, 0.45), 1e-4)
    assert found.ok and all("NMS keeps whichever" in d.why for d in found.diffs), [d.describe() for d in found.diffs]
    untied = [0, 1, 0.65, 0.17, 0.0, 0.67, 1.0]
    assert not compare_detections(blob(A, untied), blob(A, first), Thresholds(None, 0.45), 1e-4).ok
    closer = [0, 1, 0.7, 0.1, 0.0, 0.6, 1.0]     # IoU 0.67: the same detection, moved
    moved = compare_detections(blob(A, closer), blob(A, first), Thresholds(None, 0.45), 1e-4)
    assert kinds(moved) == [("moved", REAL)]


def test_tie_at_the_top_k_cut():
    """top_k 2 per class: the last candidate of class 2 is one of two tied ones."""
    top = [0, 2, 0.8, 0.0, 0.0, 0.2, 0.2]
    caffe_last = [0, 2, 0.5, 0.5, 0.5, 0.7, 0.7]
    hybrid_last = [0, 2, 0.50000004, 0.0, 0.6, 0.2, 0.8]
    cut = Thresholds(confidence=0.3, nms=0.45, top_k=2)
    found = compare_detections(blob(A, top, hybrid_last), blob(A, top, caffe_last), cut, 1e-4)
    assert found.ok and all("top_k" in d.why for d in found.diffs), [d.describe() for d in found.diffs]
    assert not compare_detections(blob(A, top, hybrid_last), blob(A, top, caffe_last), THRESHOLDS, 1e-4).ok
    # a tied pair that is not at the bottom of its class is no top_k tie
    low = [0, 2, 0.4, 0.8, 0.8, 0.9, 0.9]
    assert not compare_detections(blob(A, top, hybrid_last, low), blob(A, top, caffe_last, low), cut, 1e-4).ok


def test_order_of_rows():
    swapped = compare_detections(blob(B, A), blob(A, B), THRESHOLDS, 1e-4)
    assert ("order", REAL) in kinds(swapped) and not swapped.ok
    labels_down = compare_detections(blob(C, A, B), blob(A, B, C), THRESHOLDS, 1e-4)
    assert not labels_down.ok
    tied = [0, 1, 0.9, 0.60, 0.05, 0.80, 0.25]
    found = compare_detections(blob(tied, A), blob(A, tied), THRESHOLDS, 1e-4)
    assert found.ok and set(kinds(found)) == {("order", NEAR_TIE)}
    # without nms_param (and no keep_top_k cut) Caffe keeps prior order, whatever the scores
    no_nms = Thresholds(None, None)
    assert compare_detections(blob(B, A), blob(B, A), no_nms, 1e-4).ok
    assert not compare_detections(blob(tied, A), blob(A, tied), no_nms, 1e-4).ok
    cut = Thresholds(None, None, keep_top_k=2)  # a cut sorts by score again
    assert compare_detections(blob(tied, A), blob(A, tied), cut, 1e-4).ok


def test_rows_of_one_class_that_overlap_above_the_threshold_are_real():
    overlapping = [0, 1, 0.5, 0.12, 0.10, 0.32, 0.30]  # IoU 0.82 with A: Caffe's NMS keeps only one
    found = compare_detections(blob(A, overlapping), blob(A, overlapping), THRESHOLDS, 1e-4)
    assert ("overlap", REAL) in kinds(found) and not found.ok


# The reviewer's adversarial rows: each only looks like a near-tie (an equal score somewhere
# else, a counterpart of itself) and must be reported real, whatever cut is in force.
CAFFE = [[0, 1, 0.90, 0.10, 0.10, 0.30, 0.30], [0, 2, 0.90, 0.60, 0.60, 0.80, 0.90],
         [0, 3, 0.50, 0.40, 0.05, 0.55, 0.20]]


def _changed(edit) -> list[list[float]]:
    rows = [list(r) for r in CAFFE]
    return edit(rows) or rows


ADVERSARIAL = {
    "labels_of_equal_scores_swapped": lambda r: (r[0].__setitem__(1, 2), r[1].__setitem__(1, 1)) and None,
    "box_off_with_a_tie_elsewhere": lambda r: r[0].__setitem__(slice(3, 7), [0.12, 0.12, 0.35, 0.36]),
    "box_off_with_a_unique_score": lambda r: r[2].__setitem__(slice(3, 7), [0.42, 0.06, 0.58, 0.22]),
    "garbage_row_with_a_tied_score": lambda r: r + [[0, 3, 0.90, 0.0, 0.7, 0.1, 0.8]],
    "missing_row_with_a_tied_score": lambda r: r[1:],
    "scores_exchanged": lambda r: (r[0].__setitem__(2, 0.5), r[2].__setitem__(2, 0.9)) and None,
    "wrong_label_unique_score": lambda r: r[2].__setitem__(1, 4),
    "wrong_image": lambda r: r[0].__setitem__(0, 1),
    "nan_score": lambda r: r[2].__setitem__(2, np.nan),
    "nan_coordinate": lambda r: r[2].__setitem__(3, np.nan),
    "every_label_plus_one": lambda r: [[x[0], x[1] + 1, *x[2:]] for x in r],
}


@pytest.mark.parametrize("thresholds", [Thresholds(0.25, 0.45), ALL_CUTS, Thresholds(0.25, 0.45, 3, 3)],
                         ids=["no_cuts", "loose_cuts", "tight_cuts"])
@pytest.mark.parametrize("edit", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
def test_adversarial_rows_are_real(edit, thresholds):
    found = compare_detections(blob(*_changed(edit)), blob(*CAFFE), thresholds, 1e-4)
    assert not found.ok and found.rel_l2 == float("inf"), [d.describe() for d in found.diffs]
    assert compare_detections(blob(*CAFFE), blob(*CAFFE), thresholds, 1e-4).ok


def test_a_changed_label_is_real_even_at_the_confidence_threshold():
    at_threshold = [0, 2, 0.30001, 0.6, 0.1, 0.8, 0.2]
    relabelled = [0, 3, 0.30001, 0.6, 0.1, 0.8, 0.2]
    found = compare_detections(blob(A, relabelled), blob(A, at_threshold), THRESHOLDS, 1e-4)
    assert kinds(found) == [("label", REAL)]


def test_outputs_of_another_shape_are_compared_as_detections_only_when_named():
    plain = compare_outputs({"out": blob(A)}, {"out": blob(A, B)})
    assert plain[0].rel_l2 == float("inf") and not plain[0].within(1e-4)
    named = compare_outputs({"out": blob(A)}, {"out": blob(A, B)}, detections={"out": THRESHOLDS})
    assert named[0].detections is not None and not named[0].within(1e-4)


def test_thresholds_come_from_the_layer():
    text = net('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" top: "out" '
               'detection_output_param { num_classes: 3 nms_param { nms_threshold: 0.45 top_k: 5 eta: 0.9 } '
               'keep_top_k: 7 confidence_threshold: 0.1 } }', loc=(1, 32), conf=(1, 24), prior=(1, 2, 32))
    f32 = lambda v: float(np.float32(v))  # protobuf floats
    assert detection_outputs(load_text(text)[1])["out"] == Thresholds(f32(0.1), f32(0.45), 5, 7, f32(0.9))
    # without nms_param this Caffe applies no threshold and no top_k; top_k above the priors cuts nothing
    bare = text.replace("nms_param { nms_threshold: 0.45 top_k: 5 eta: 0.9 } ", "")
    assert detection_outputs(load_text(bare)[1])["out"] == Thresholds(None, None, None, 7, 1.0)
    roomy = text.replace("top_k: 5", "top_k: 8")
    assert detection_outputs(load_text(roomy)[1])["out"].top_k is None


def _caffe_top(model, feed: dict[str, np.ndarray]) -> np.ndarray:
    caffe = model.reference_net()
    caffe.forward(**feed)
    return np.array(caffe.blobs["out"].data, copy=True)


def _corner_net(params: str, priors: int) -> tuple:
    """DetectionOutput with CORNER boxes and the variance in the target: box = prior + loc."""
    return load_text(net('layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "prior" '
                         'top: "out" detection_output_param { num_classes: 2 code_type: CORNER '
                         f'variance_encoded_in_target: true {params} }} }}',
                         loc=(1, priors * 4), conf=(1, priors * 2), prior=(1, 2, priors * 4)))


def _feed(boxes: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    n = len(boxes)
    return {"loc": np.zeros((1, n * 4), np.float32),
            "conf": np.stack([1 - scores, scores], axis=1).reshape(1, -1).astype(np.float32),
            "prior": np.stack([np.asarray(boxes, np.float32).ravel(), np.full(n * 4, 0.1, np.float32)])[None]}


def test_two_caffe_runs_split_by_a_keep_top_k_near_tie():
    """The 7th and 8th best scores differ by 1e-6 and keep_top_k is 7: a nudge below the
    tolerance swaps which one Caffe keeps. Both blobs are Caffe's own."""
    priors = 8
    model, graph = _corner_net("nms_param { nms_threshold: 0.45 } keep_top_k: 7 confidence_threshold: 0.1", priors)
    boxes = np.array([[0.1 * i, 0.0, 0.1 * i + 0.08, 0.5] for i in range(priors)])  # disjoint
    scores = np.linspace(0.9, 0.5, priors)
    scores[7] = scores[6] - 1e-6
    feed = _feed(boxes, scores)
    before = _caffe_top(model, feed)
    feed["conf"][0, 15] += 3e-6  # prior 7 now just above prior 6
    after = _caffe_top(model, feed)
    found = compare_detections(after, before, detection_outputs(graph)["out"], 1e-4)
    assert found.ok and {(d.kind, d.cause) for d in found.diffs} >= {("missing", NEAR_TIE), ("extra", NEAR_TIE)}
    assert not compare_detections(after, before, detection_outputs(graph)["out"], 1e-8).ok


def test_two_caffe_runs_split_by_an_nms_near_tie():
    """`borderline` overlaps `kept` by the NMS threshold give or take 1e-6: one run keeps it
    (and so suppresses `shadow`), the other drops it (and keeps `shadow`)."""
    model, graph = _corner_net("nms_param { nms_threshold: 0.3 } confidence_threshold: 0.1", 3)
    x = 0.264 / 1.3  # IoU((0, 0, 0.45, 1), (x, 0, x + 0.62, 1)) = 0.3
    runs = []
    for nudge in (-3e-6, 3e-6):
        boxes = np.array([[0, 0, 0.45, 1], [x + nudge, 0, x + nudge + 0.62, 1], [x + 0.3, 0, x + 0.92, 1]])
        runs.append(_caffe_top(model, _feed(boxes, np.array([0.9, 0.8, 0.7]))))
    suppressed, kept = runs
    assert suppressed.shape[2] == kept.shape[2] == 2 and not np.allclose(suppressed, kept)
    found = compare_detections(kept, suppressed, detection_outputs(graph)["out"], 1e-4)
    assert found.ok, [d.describe() for d in found.diffs]
    assert any("NMS threshold" in d.why for d in found.diffs) and any("knock-on" in d.why for d in found.diffs)
    assert not compare_detections(kept, suppressed, detection_outputs(graph)["out"], 1e-8).ok


SSD = "mobilenet_ssd/MobileNetSSD_deploy.prototxt"


def test_forty_thousand_rows(shared_models, tmp_path):
    """MobileNet-SSD without nms_param and keep_top_k: every prior of every class is a row
    (38,340 per image); the comparison must match them all, and notice a shuffle."""
    text = (shared_models / SSD).read_text()
    start = text.index("nms_param {")
    text = text[:start] + text[text.index("}", start) + 1:]
    path = tmp_path / "no_nms.prototxt"
    path.write_text(text.replace("keep_top_k: 100", "keep_top_k: -1"))
    hybrid = load(path, random_weights=3)
    inputs = {"data": np.random.default_rng(0).normal(size=(1, 3, 300, 300)).astype(np.float32)}
    got, want = hybrid.run(inputs)["detection_out"], hybrid.run_caffe(inputs)["detection_out"]
    thresholds = detection_outputs(hybrid.graph)["detection_out"]
    assert want.shape == (1, 1, 38340, 7)
    found = compare_detections(got, want, thresholds, 1e-4)
    assert found.ok and found.matched == 38340, found.summary()
    shuffled = got[:, :, np.random.default_rng(1).permutation(38340)]
    assert not compare_detections(shuffled, want, thresholds, 1e-4).ok
    hybrid.close()


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
        # The detections, and the confidences before their Softmax (mbox_conf_softmax).
        detections, logits = row["accuracy"]
        assert logits["output"] == "mbox_conf_reshape" and logits["rel_l2"] <= 1e-4
        assert detections["detections"]["real"] == 0 and detections["detections"]["matched"] > 0
        assert not row["refused"]


def test_diff_lists_detections(shared_models, capsys):
    status = main(["diff", str(shared_models / SSD), "--random-weights", "11"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "detection_out as detections:" in out and "same rows in the same order" in out


WRONG = {
    # an off-by-one in the labels (a background-class slip): same boxes and scores
    "labels": "np.array([0, 1, 0, 0, 0, 0, 0], np.float32)",
    # boxes moved right by 0.05
    "boxes": "np.array([0, 0, 0, 0.05, 0, 0.05, 0], np.float32)",
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_a_wrong_lowering_fails_run_compare_and_diff(shared_models, tmp_path, capsys, wrong):
    module = tmp_path / f"wrong_{wrong}.py"
    module.write_text(textwrap.dedent(f'''
        import numpy as np
        from hybrid_infer.lowering import register_lowering
        from hybrid_infer.lowering.detection import check_detection_output, lower_detection_output

        @register_lowering("DetectionOutput", check=check_detection_output, replace=True)
        def wrong(ctx, layer, inputs, outputs):
            right = ctx.fresh(outputs[0] + "_right")
            lower_detection_output(ctx, layer, inputs, [right])
            ctx.node("Add", [right, ctx.const({WRONG[wrong]}, "change")], outputs, layer=layer.name)
            ctx.declare_dims(outputs[0], (1, 1, "detections", 7))
    '''))
    model = str(shared_models / SSD)
    common = ["--random-weights", "1", "--lowerings", str(module)]
    with REGISTRY.scope():
        assert main(["run", model, *common, "--check"]) == 1
        out = capsys.readouterr().out
        assert "DIFFERENT" in out and " 0 real difference" not in out, out
        report = tmp_path / "compare.json"
        assert main(["compare", model, *common, "--runs", "1", "--warmup", "0", "--partition", "min=3",
                     "--json", str(report)]) == 1
        row = next(r for r in json.loads(report.read_text())["partitions"] if r["spec"] != "caffe")
        assert row["refused"] and row["accuracy"][0]["rel_l2"] == float("inf")
        capsys.readouterr()
        assert main(["diff", model, *common]) == 1
        out = capsys.readouterr().out
        assert "first value above" in out and "detection_out" in out.split("first value above")[1], out


def test_rows_with_no_candidate_at_all():
    """Every hybrid row of a label moved: no row of the group is even a candidate."""
    moved = [[r[0], r[1], r[2], r[3] + 0.05, r[4], r[5] + 0.05, r[6]] for r in CAFFE]
    found = compare_detections(blob(*moved), blob(*CAFFE), THRESHOLDS, 1e-4)
    assert not found.ok and found.matched == 0 and len(found.real) == 3
