"""Long fuzz run: thousands of hostile cases through the real hybrid-infer, with a summary.

The same loop as tests/test_fuzz.py (mutators in tests/fuzz_mutators.py, harness in
tests/fuzz_harness.py), for a number of cases instead of a time budget. Prints a table of
outcomes per mutator (Markdown) and every case that broke the promise, and optionally
writes them as JSON. Folders of broken cases are kept under --root for inspection.

    .venv/bin/python scripts/fuzz.py --cases 2000 --seed 1 --json results/fuzz.json

Exit code 0 when no case broke the promise, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_harness import BROKEN, Outcome, Runner, describe, golden_cache, remove_folder, summary_table  # noqa: E402
from fuzz_mutators import SEEDS, make_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="number of cases (2000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the run; a case is (seed, number)")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once, one worker each (1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    parser.add_argument("--root", type=Path, help="folder for the case folders (default: a new temporary one)")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="hybrid_infer_fuzz_"))
    lenet = next(s for s in SEEDS if s.name == "lenet_digits")
    setup = Runner(root / "setup", args.timeout)
    golden = golden_cache(setup, ["build", str(lenet.prototxt), "--weights", str(lenet.weights),
                                  "--engine-cache", "cache", "--tensorrt-module", "tensorrt_rtx"])
    setup.close()
    outcomes: dict[int, Outcome] = {}
    lock = threading.Lock()
    start = time.monotonic()

    failures: list[BaseException] = []

    def work(job: int) -> None:
        runner = Runner(root / f"job{job}", args.timeout)
        try:
            for index in range(job, args.cases, args.jobs):
                folder = runner.new_folder()
                outcome = runner.run(make_case(index, args.seed, folder, golden), folder)
                if outcome.category not in BROKEN:
                    remove_folder(folder)
                with lock:
                    outcomes[index] = outcome
                    done = len(outcomes)
                    if outcome.category in BROKEN:
                        print(describe(outcome), flush=True)
                    if done % 100 == 0:
                        print(f"{done}/{args.cases} cases, {time.monotonic() - start:.0f} s", file=sys.stderr,
                              flush=True)
        except BaseException as exc:  # a fault of the harness itself: reported after the others finish
            failures.append(exc)
            raise
        finally:
            runner.close()

    threads = [threading.Thread(target=work, args=(job,)) for job in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"the fuzz harness itself failed after {len(outcomes)} cases") from failures[0]
    ordered = [outcomes[i] for i in sorted(outcomes)]
    seconds = time.monotonic() - start
    broken = [o for o in ordered if o.category in BROKEN]
    print(f"\n{len(ordered)} cases (seed {args.seed}) in {seconds / 60:.1f} min, {args.jobs} job(s), "
          f"engine cache cases {'on a real TensorRT-RTX entry' if golden else 'WITHOUT a built entry'}; "
          f"case folders under {root}\n")
    print(summary_table(ordered))
    if args.json:
        args.json.write_text(json.dumps({
            "seed": args.seed, "cases": len(ordered), "seconds": round(seconds, 1), "jobs": args.jobs,
            "outcomes": [{"index": i, "mutator": o.case.mutator, "description": o.case.description,
                          "argv": o.case.argv, "api": o.case.api, "category": o.category, "detail": o.detail,
                          "seconds": round(o.seconds, 2)} for i, o in enumerate(ordered)]}, indent=1) + "\n")
    if not broken:
        remove_folder(root)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
