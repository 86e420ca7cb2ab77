"""The project's own fuzz test (issue 13): a seeded loop of hostile cases within a fixed time.

Each case is a mutated model, input file, command line, output path, engine cache state or
API call (``fuzz_mutators.py``), run as the real command (``fuzz_harness.py``). Every case
must end with a correct result (exit 0; runs are checked against Caffe), a clean one-line
error (exit 2), or a check that refuses to vouch for all-NaN outputs; never a traceback, a
signal, a hang, a changed special file, a left-over temporary file or a wrong result.
``scripts/fuzz.py`` runs the same loop for thousands of cases.
"""
from __future__ import annotations

import os

from fuzz_harness import BROKEN, CLEAN, OK, Runner, describe, fuzz_loop, golden_cache, summary_table
from fuzz_mutators import MUTATORS, SEEDS, make_case

#: Seconds of cases in CI; HYBRID_INFER_FUZZ_SECONDS changes it (the cases are the same,
#: only how many of them run).
BUDGET = float(os.environ.get("HYBRID_INFER_FUZZ_SECONDS", "75"))
SEED = 13


def test_hostile_inputs_keep_the_promise(tmp_path):
    runner = Runner(tmp_path, timeout=60)
    lenet = next(s for s in SEEDS if s.name == "lenet_digits")
    try:
        golden = golden_cache(runner, ["build", str(lenet.prototxt), "--weights", str(lenet.weights),
                                       "--engine-cache", "cache", "--tensorrt-module", "tensorrt_rtx"])
        outcomes = fuzz_loop(make_case, runner, SEED, seconds=BUDGET, golden=golden)
    finally:
        runner.close()
    print(f"\n{len(outcomes)} hostile cases in {BUDGET:.0f} s (seed {SEED}):\n{summary_table(outcomes)}")
    broken = [o for o in outcomes if o.category in BROKEN]
    assert not broken, "\n".join(describe(o) for o in broken)
    assert golden is not None, "the engine cache cases need a real TensorRT-RTX build"
    categories = {o.category for o in outcomes}
    assert len(outcomes) >= 30 and {OK, CLEAN} <= categories
    assert len({o.case.mutator for o in outcomes}) >= len(MUTATORS) // 2
