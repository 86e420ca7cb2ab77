"""Runs hostile cases through the real ``hybrid-infer`` and checks the promise for each.

The promise (README, "Bad input"): every run ends with exit 0 and a correct result, or with
exit 2 and one clean error line; never a Python traceback, a signal (Caffe's abort), a hang,
a special file replaced, or a temporary file left behind.

How a case runs: a worker process (this file run with ``--worker``) imports hybrid_infer,
pycaffe, ONNX and Pillow once, then forks one child per case. The child becomes
exactly what ``hybrid-infer ARGS`` is, only without the start-up cost: it moves to the case
folder, points ``TMPDIR`` there, sends its output to files, calls ``cli.main.main(argv)``
and exits through the interpreter (so finalizers, atexit and tracebacks behave as in the
real command; ONNX Runtime is the one library each case imports anew, see ``serve``).
The worker waits with a timeout and kills the child's whole process group
on a hang; a signal or a timeout is recorded for the harness. Children get no core files
and an 8 GiB address-space limit, so a runaway case cannot take the shared machine down.

``tests/test_fuzz.py`` runs a seeded loop within a fixed time; ``scripts/fuzz.py`` runs
thousands of cases and prints the summary table. Cases come from ``fuzz_mutators.py``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
CHILD_ADDRESS_SPACE = 8 * 2**30

#: Outcome categories. The first three keep the promise: a correct result (exit 0), a clean
#: error (exit 2, one line), or a check that refuses to vouch for NaN (exit 1, saying so):
#: outputs Caffe itself gives as NaN/Inf everywhere, or NaN inputs, which Caffe's max
#: pooling skips (pooling_layer.cpp compares with ">") where ONNX's propagates them. The rest
#: break it; MISMATCH is a check that found the hybrid off from Caffe: a wrong result.
OK, CLEAN, NAN_VERDICT = "ok", "clean error", "NaN verdict"
MISMATCH, TRACEBACK, ABORT, HANG = "mismatch", "traceback", "abort", "hang"
CLOBBERED, LEFTOVER, UNCLEAR = "special file changed", "left-over file", "unclear error"
CATEGORIES = (OK, CLEAN, NAN_VERDICT, MISMATCH, TRACEBACK, ABORT, HANG, CLOBBERED, LEFTOVER, UNCLEAR)
BROKEN = (MISMATCH, TRACEBACK, ABORT, HANG, CLOBBERED, LEFTOVER, UNCLEAR)


@dataclass
class Case:
    """One hostile run. ``argv`` is what follows ``hybrid-infer``; ``api`` instead is Python
    code run with ``hybrid_infer`` and ``np`` imported. Paths inside are relative to the
    case folder. ``specials`` must keep their identity (type, inode, device, link target);
    ``export_dir`` must not end up with ONNX files but no manifest."""
    mutator: str
    description: str
    argv: list[str] = field(default_factory=list)
    api: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)
    specials: list[str] = field(default_factory=list)
    export_dir: Optional[str] = None
    #: The inputs hold NaN: a check may rightly fail (see NAN_VERDICT).
    nan_inputs: bool = False


@dataclass
class Outcome:
    case: Case
    category: str
    detail: str
    seconds: float
    folder: Path


# --- the worker: one fork per case ------------------------------------------------------------

def _child(job: dict) -> None:
    """In the forked child: become ``hybrid-infer ARGV``; raises SystemExit (or anything)."""
    os.setpgid(0, 0)
    resource_limits()
    folder = Path(job["dir"])
    os.chdir(folder)
    for fd, name, mode in ((0, os.devnull, os.O_RDONLY), (1, "stdout", os.O_WRONLY | os.O_CREAT),
                           (2, "stderr", os.O_WRONLY | os.O_CREAT)):
        os.dup2(os.open(name, mode, 0o644), fd)
    os.environ.update(job["env"])
    sys.path[:0] = [p for p in job["env"].get("PYTHONPATH", "").split(":") if p]  # Python layers
    import tempfile
    tempfile.tempdir = None  # recomputed from TMPDIR
    sys.argv = ["hybrid-infer", *job["argv"]]
    if job["api"] is None:
        from hybrid_infer.cli.main import main
        raise SystemExit(main(job["argv"]))
    import numpy as np

    import hybrid_infer
    from hybrid_infer.errors import HybridInferError
    try:
        exec(job["api"], {"hybrid_infer": hybrid_infer, "np": np})
    except HybridInferError as exc:
        print(f"hybrid-infer: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(0)


def resource_limits() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


def _wait(pid: int, timeout: float) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", 0
        time.sleep(0.005)
    try:
        os.killpg(pid, signal.SIGKILL)  # anything the case left running (there should be none)
    except ProcessLookupError:
        pass
    if os.WIFSIGNALED(status):
        return "signal", os.WTERMSIG(status)
    return "exit", os.waitstatus_to_exitcode(status)


def serve() -> None:
    """Worker loop: a JSON job per line on stdin, a JSON report per line on stdout."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    sys.path.insert(0, str(REPO / "graphs" / "python_layers"))
    # Imported once here, inherited by every case. Not ONNX Runtime: a process forked after
    # importing it hangs or aborts at exit (its threads are gone), so each case imports it.
    import onnx  # noqa: F401
    from PIL import Image  # noqa: F401

    import hybrid_infer.cli.main  # noqa: F401
    from hybrid_infer.model.caffe_import import caffe
    caffe()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(job)  # never returns: SystemExit or an exception ends the child's interpreter
        status, code = _wait(pid, job["timeout"])
        print(json.dumps({"status": status, "code": code, "seconds": time.monotonic() - start}), flush=True)


# --- the harness side ----------------------------------------------------------------------------

def _identity(path: Path) -> Optional[tuple]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), st.st_ino, st.st_rdev, link


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


#: What hybrid_infer's temporary files and folders look like: ``.NAME.XXXX.tmp`` (atomic
#: writes), ``NAME.tmpPID``, ``hybrid_infer_*`` folders; anything new under ``tmp/`` counts too.
_LEFTOVER = re.compile(r"(^|/)\.[^/]*$|\.tmp\d*$|hybrid_infer_")


class Runner:
    """Starts a worker and runs cases through it, each in its own folder under ``root``."""

    def __init__(self, root: Path, timeout: float = 120.0):
        self.root = root
        self.timeout = timeout
        self.count = 0
        self._worker: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        if self._worker is None or self._worker.poll() is not None:
            env = {**os.environ, "GLOG_minloglevel": "2", "PYTHONPATH": str(REPO)}
            self._worker = subprocess.Popen([sys.executable, str(Path(__file__)), "--worker"], cwd=REPO,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            assert json.loads(self._worker.stdout.readline())["ready"]
        return self._worker

    def new_folder(self) -> Path:
        self.count += 1
        folder = self.root / f"case{self.count:05d}"
        (folder / "tmp").mkdir(parents=True)
        return folder

    def run(self, case: Case, folder: Path) -> Outcome:
        """Run ``case`` (its files already in ``folder``) and judge the result."""
        worker = self._start()
        specials = {name: _identity(folder / name) for name in case.specials}
        before = _tree(folder)
        env = {"TMPDIR": str(folder / "tmp"), "HYBRID_INFER_ENGINE_CACHE": str(folder / "engine-cache"),
               **case.env}
        job = {"dir": str(folder), "argv": case.argv, "api": case.api, "env": env, "timeout": self.timeout}
        worker.stdin.write(json.dumps(job) + "\n")
        worker.stdin.flush()
        report = json.loads(worker.stdout.readline())
        category, detail = judge(case, folder, report, specials, before)
        return Outcome(case, category, detail, report["seconds"], folder)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stdin.close()
            self._worker.wait(timeout=30)
            self._worker = None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


#: The relative L2 error FP32 results are promised within (per layer type); a check asked
#: for at a tighter --tolerance may rightly fail.
FP32_PROMISE = 1e-5


def _tolerance(argv: list[str]) -> float:
    for i, arg in enumerate(argv):
        text = arg.split("=", 1)[1] if arg.startswith("--tolerance=") else \
            (argv[i + 1] if arg == "--tolerance" and i + 1 < len(argv) else None)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                pass
    return 1e-4


def _onnx_without_manifest(out: Path) -> bool:
    try:
        return out.is_dir() and any(out.glob("*.onnx")) and not (out / "manifest.json").is_file()
    except OSError:  # a name too long to be a folder: nothing was exported
        return False


def judge(case: Case, folder: Path, report: dict, specials: dict, before: set[str]) -> tuple[str, str]:
    """The outcome category of a finished case, and the line that shows why."""
    stdout, stderr = _read(folder / "stdout"), _read(folder / "stderr")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if report["status"] == "timeout":
        return HANG, f"no exit after {report['seconds']:.0f} s"
    if report["status"] == "signal":
        return ABORT, f"{signal.Signals(report['code']).name}: {last}"
    if "Traceback (most recent call last)" in stderr:
        return TRACEBACK, last
    for name, identity in specials.items():
        if _identity(folder / name) != identity:
            return CLOBBERED, f"{name} changed"
    leftovers = sorted(p for p in _tree(folder) - before if _LEFTOVER.search(p) or p.startswith("tmp/"))
    if leftovers:
        return LEFTOVER, ", ".join(leftovers[:3])
    if case.export_dir and _onnx_without_manifest(folder / case.export_dir):
        return LEFTOVER, f"{case.export_dir} holds ONNX files without manifest.json"
    code = report["code"]
    if code == 0:
        return OK, ""
    if code == 1:
        verdict = [ln.strip() for ln in stdout.splitlines() if re.search(r"ABOVE|refused:|first value above", ln)]
        if verdict and (case.nan_inputs or all("no finite value" in ln for ln in verdict)):
            return NAN_VERDICT, verdict[0]
        if verdict and _tolerance(case.argv) < FP32_PROMISE:
            return OK, f"above the --tolerance asked for, below FP32 precision: {verdict[0]}"
        return MISMATCH, (verdict[0] if verdict else last)
    errors = [ln for ln in lines if re.match(r"^hybrid-infer( \w+)?: error: ", ln)]
    if code == 2 and len(errors) == 1 and errors[0] == last:
        return CLEAN, last
    return UNCLEAR, f"exit {code}: {last}"


# --- the summary table ---------------------------------------------------------------------

def summary_table(outcomes: list[Outcome]) -> str:
    """Counts per mutator and category, as a Markdown table with a total row."""
    counts: dict[str, Counter] = {}
    for o in outcomes:
        counts.setdefault(o.case.mutator, Counter())[o.category] += 1
    header = ["mutator", "cases", *CATEGORIES]
    rows = [[m, str(sum(c.values())), *(str(c[k]) for k in CATEGORIES)] for m, c in sorted(counts.items())]
    total = sum(counts.values(), Counter())
    rows.append(["**total**", str(len(outcomes)), *(str(total[k]) for k in CATEGORIES)])
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def describe(o: Outcome) -> str:
    what = f"api: {o.case.api!r}" if o.case.api else "hybrid-infer " + " ".join(o.case.argv)
    return f"[{o.category}] {o.case.mutator}: {o.case.description}\n    {what}\n    -> {o.detail}\n    ({o.folder})"


def remove_folder(folder: Path) -> None:
    """Remove a passed case's folder, FIFOs, device nodes and unwritable folders included."""
    for path in [folder, *folder.rglob("*")]:
        try:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


MakeCase = Callable[[int, int, Path, Optional[Path]], Case]


def golden_cache(runner: Runner, argv: list[str]) -> Optional[Path]:
    """An engine cache with one real entry (``argv`` is a ``build`` into ``cache``), which
    engine cache cases copy and damage; None if it could not be built here."""
    folder = runner.new_folder()
    outcome = runner.run(Case("setup", "golden engine cache", argv), folder)
    return folder / "cache" if outcome.category == OK and any((folder / "cache").glob("*.plan")) else None


def fuzz_loop(make_case: MakeCase, runner: Runner, seed: int, *, cases: Optional[int] = None,
              seconds: Optional[float] = None, golden: Optional[Path] = None,
              progress: Optional[Callable[[int, Outcome], None]] = None) -> list[Outcome]:
    """Cases 0, 1, 2, ... of the run seeded ``seed`` until ``cases`` ran or ``seconds`` passed
    (whichever comes first); folders of cases that kept the promise are removed."""
    outcomes: list[Outcome] = []
    start = time.monotonic()
    index = 0
    while (cases is None or index < cases) and (seconds is None or time.monotonic() - start < seconds):
        folder = runner.new_folder()
        outcome = runner.run(make_case(index, seed, folder, golden), folder)
        if outcome.category not in BROKEN:
            remove_folder(folder)
        outcomes.append(outcome)
        if progress:
            progress(index, outcome)
        index += 1
    return outcomes


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    serve()
