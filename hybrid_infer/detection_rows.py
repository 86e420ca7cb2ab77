"""Vectorised arithmetic on DetectionOutput rows: closeness, Caffe's box overlap, grouping
and one-to-one matching of two row sets.

Rows are float64 arrays ``[N, 7]``: ``[image, label, score, xmin, ymin, xmax, ymax]``, as the
bundled Caffe's DetectionOutput writes them (src/caffe/layers/detection_output_layer.cpp).
Everything here is numpy over whole groups of rows, so that the comparison of a blob of
tens of thousands of rows (DetectionOutput without ``nms_param``) takes well under a second.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

IMAGE, LABEL, SCORE = 0, 1, 2
BOX = slice(3, 7)
#: Score and box columns: what must agree for two rows to be the same detection.
VALUES = slice(2, 7)
#: Largest candidate matrix (rows x candidates) built at once while matching.
_CHUNK = 1 << 22


def margin(expected: np.ndarray, tolerance: float) -> np.ndarray:
    """The allowed difference from ``expected``: ``tolerance`` times max(1, |expected|)
    (absolute for small values, relative for large ones: boxes decoded with large offsets
    reach 1e30, where float32's spacing alone is far above any absolute tolerance); 0 for
    an infinite or NaN value, which only an identical value matches."""
    values = np.asarray(expected, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(np.isfinite(values), tolerance * np.maximum(1.0, np.abs(values)), 0.0)


def close(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> np.ndarray:
    """Element-wise: equal (the same infinity, or both NaN) or within ``margin``."""
    with np.errstate(invalid="ignore", over="ignore"):
        return ((actual == expected) | (np.isnan(actual) & np.isnan(expected))
                | (np.abs(actual - expected) <= margin(expected, tolerance)))


def sizes(boxes: np.ndarray) -> np.ndarray:
    """Caffe's BBoxSize of normalised boxes [..., 4]: 0 for an inverted box."""
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where((width < 0) | (height < 0), 0.0, width * height)


def overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Caffe's JaccardOverlap (bbox_util.cpp, normalised boxes) of every box of ``a`` [n, 4]
    with every box of ``b`` [m, 4]: [n, m]; 0 where the intersection has no positive width
    and height (so an inverted box overlaps nothing, not even itself)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
        height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
        inter = width * height
        union = sizes(a)[:, None] + sizes(b)[None, :] - inter
        return np.where((width > 0) & (height > 0), inter / union, 0.0)


def group_ids(*keys: np.ndarray) -> list[np.ndarray]:
    """One shared integer id per distinct key row across all ``keys`` arrays ([n_i, k] each)."""
    if not sum(len(k) for k in keys):
        return [np.zeros(0, dtype=np.int64) for _ in keys]
    stacked = np.concatenate([np.asarray(k, dtype=np.float64).reshape(len(k), keys[0].shape[1]) for k in keys])
    _, inverse = np.unique(stacked, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    bounds = np.cumsum([0, *(len(k) for k in keys)])
    return [inverse[bounds[i]:bounds[i + 1]] for i in range(len(keys))]


def groups(ids_a: np.ndarray, ids_b: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each id in ``ids_a`` or ``ids_b``: the positions holding it in each (either may be empty)."""
    order_a, order_b = np.argsort(ids_a, kind="stable"), np.argsort(ids_b, kind="stable")
    sorted_a, sorted_b = ids_a[order_a], ids_b[order_b]
    for gid in np.union1d(ids_a, ids_b):
        yield (order_a[np.searchsorted(sorted_a, gid, "left"):np.searchsorted(sorted_a, gid, "right")],
               order_b[np.searchsorted(sorted_b, gid, "left"):np.searchsorted(sorted_b, gid, "right")])


def _windows(expected: np.ndarray, actual: np.ndarray, tolerance: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows of one group: the actual rows sorted by one of the score and box columns, and
    for each expected row the window [lo, hi) of that order whose values in that column lie
    within its margin. The column is the one whose windows hold the fewest rows (scores of a
    random net cluster, boxes repeat across the classes of one prior: either alone may be
    poor)."""
    best = None
    for column in range(VALUES.start, VALUES.stop):
        order = np.argsort(actual[:, column], kind="stable")
        values = actual[order, column]
        want = expected[:, column]
        slack = margin(want, tolerance)
        with np.errstate(invalid="ignore"):
            lo = np.searchsorted(values, want - slack, "left")
            hi = np.searchsorted(values, want + slack, "right")
        nan = np.isnan(want)  # NaN sorts last: try the NaN values
        lo[nan], hi[nan] = np.searchsorted(values, np.nan, "left"), len(values)
        size = int((hi - lo).sum())
        if best is None or size < best[0]:
            best = (size, order, lo, hi)
    assert best is not None
    return best[1], best[2], best[3]


def _candidates(expected: np.ndarray, actual: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """For rows of one group: [n, w] positions in ``actual`` and whether each is close to the
    expected row in score and box. Only actual rows in the row's window (``_windows``) are
    tried, so distinct values cost n log n; a window wider than the chunk is tried in parts."""
    order, lo, hi = _windows(expected, actual, tolerance)
    width = int((hi - lo).max(initial=0))
    if width == 0:
        return np.zeros((len(expected), 0), dtype=np.int64), np.zeros((len(expected), 0), dtype=bool)
    positions = np.empty((len(expected), width), dtype=np.int64)
    ok = np.empty((len(expected), width), dtype=bool)
    step = max(1, _CHUNK // width)
    for start in range(0, len(expected), step):
        part = slice(start, start + step)
        slots = lo[part, None] + np.arange(width)
        inside = slots < hi[part, None]
        slots = order[np.minimum(slots, len(order) - 1)]
        positions[part] = slots
        ok[part] = inside & close(actual[slots][:, :, VALUES], expected[part, None, VALUES], tolerance).all(axis=2)
    return positions, ok


def _equal_pairs(expected: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows equal in every column (bit for bit), paired one to one in order: the usual case
    for rows computed the same way, found by sorting instead of by windows."""
    ids_e, ids_a = group_ids(expected, actual)
    rank = lambda ids: np.argsort(np.argsort(ids, kind="stable"), kind="stable") - \
        np.searchsorted(np.sort(ids), ids, "left")  # how many earlier rows share the id
    scale = max(len(expected), len(actual)) + 1
    key_e = ids_e * scale + rank(ids_e)
    key_a = ids_a * scale + rank(ids_a)
    common, at_e, at_a = np.intersect1d(key_e, key_a, assume_unique=True, return_indices=True)
    return at_e, at_a


def _assign(expected: np.ndarray, actual: np.ndarray, positions: np.ndarray, ok: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one pairs (expected row, actual row) among close candidates: rows with a single
    candidate that no other row wants are paired at once; the rest, the most constrained
    first, take their closest free candidate."""
    if not ok.any():
        return []
    counts = ok.sum(axis=1)
    wanted = np.bincount(positions[ok], minlength=len(actual))
    first = positions[np.arange(len(positions)), ok.argmax(axis=1)]
    sure = (counts == 1) & (wanted[first] == 1)
    pairs = list(zip(np.flatnonzero(sure).tolist(), first[sure].tolist()))
    taken = set(first[sure].tolist())
    for row in np.flatnonzero(~sure & (counts > 0))[np.argsort(counts[~sure & (counts > 0)], kind="stable")]:
        options = [p for p in positions[row][ok[row]].tolist() if p not in taken]
        if options:
            with np.errstate(invalid="ignore"):
                error = np.nan_to_num(np.abs(actual[options][:, VALUES] - expected[row, VALUES]), nan=0.0).max(axis=1)
            best = options[int(np.argmin(error))]
            pairs.append((int(row), best))
            taken.add(best)
    return pairs


def match(expected: np.ndarray, actual: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows that are the same detection: same image and label, score and box
    ``close``. Returns (expected positions, actual positions), one-to-one. Rows already in
    the same place and close are paired first (the usual case: the same rows in the same
    order), then rows equal bit for bit, then the rest by windows (``_candidates``)."""
    n = min(len(expected), len(actual))
    in_place = np.flatnonzero((actual[:n, :2] == expected[:n, :2]).all(axis=1)
                              & close(actual[:n, VALUES], expected[:n, VALUES], tolerance).all(axis=1))
    left_e = np.setdiff1d(np.arange(len(expected)), in_place)
    left_a = np.setdiff1d(np.arange(len(actual)), in_place)
    pairs_e, pairs_a = [in_place], [in_place]
    equal_e, equal_a = _equal_pairs(expected[left_e], actual[left_a])
    pairs_e.append(left_e[equal_e])
    pairs_a.append(left_a[equal_a])
    left_e, left_a = np.delete(left_e, equal_e), np.delete(left_a, equal_a)
    ids_e, ids_a = group_ids(expected[left_e, :2], actual[left_a, :2])
    for ge, ga in groups(ids_e, ids_a):
        if not len(ge) or not len(ga):
            continue
        e_rows, a_rows = left_e[ge], left_a[ga]
        positions, ok = _candidates(expected[e_rows], actual[a_rows], tolerance)
        found = _assign(expected[e_rows], actual[a_rows], positions, ok)
        if found:
            pe, pa = np.array(found).T
            pairs_e.append(e_rows[pe])
            pairs_a.append(a_rows[pa])
    return np.concatenate(pairs_e).astype(np.int64), np.concatenate(pairs_a).astype(np.int64)
