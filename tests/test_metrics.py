"""The error figures every check prints (metrics.py): NaN and Inf are never hidden."""
from __future__ import annotations

import numpy as np

from hybrid_infer.metrics import compare_outputs, max_abs_error, nonfinite_mismatches, relative_l2

REFERENCE = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], np.float32)


def test_nonfinite_on_one_side_is_infinite_in_both_figures() -> None:
    """The reviewer's contradiction: 'max abs error 0, relative L2 inf'."""
    for bad in (np.nan, np.inf, -np.inf):
        got = REFERENCE.copy()
        got[1, 2] = bad
        for a, b in ((got, REFERENCE), (REFERENCE, got)):
            assert max_abs_error(a, b) == np.inf and relative_l2(a, b) == np.inf
            assert nonfinite_mismatches(a, b) == 1
    row, = compare_outputs({"out": got}, {"out": REFERENCE})
    assert (row.max_abs, row.rel_l2, row.nonfinite) == (np.inf, np.inf, 1)


def test_the_same_nonfinite_values_count_as_equal() -> None:
    both = REFERENCE.copy()
    both[0, 0], both[0, 1] = np.nan, -np.inf
    shifted = both.copy()
    shifted[1, 0] += 0.5
    assert (max_abs_error(both, both), relative_l2(both, both), nonfinite_mismatches(both, both)) == (0, 0, 0)
    assert max_abs_error(shifted, both) == 0.5 and nonfinite_mismatches(shifted, both) == 0
    opposite = both.copy()
    opposite[0, 1] = np.inf
    assert max_abs_error(opposite, both) == np.inf and nonfinite_mismatches(opposite, both) == 1


def test_all_zero_reference_gives_the_absolute_l2() -> None:
    zero = np.zeros((2, 3), np.float32)
    assert relative_l2(zero, zero) == 0
    got = zero.copy()
    got[0, 0], got[1, 1] = 3, 4
    assert relative_l2(got, zero) == 5 and max_abs_error(got, zero) == 4
