"""Run pycaffe work in a forked child first, so that Caffe's fatal checks cannot kill us.

Caffe reports most model errors (bad layer parameters, weights of the wrong shape, a
reshape that does not fit, a layer its CPU code does not implement) with glog ``CHECK``
failures that abort the whole process. Doing the first instantiation of a user's model,
and the first reshape and forward of each Caffe net at each new input shape, in a child
turns such an abort into an exception carrying Caffe's message; only work that survived
there is then done in the user's process.

The child is a ``fork`` of the caller: copy-on-write, so it sees the same net, weights and
inputs without copying them, and what it writes (activations) is discarded with it. It
cannot use CUDA (a CUDA context does not survive ``fork``), so nets in Caffe's GPU mode
are not rehearsed this way.
"""
from __future__ import annotations

import faulthandler
import gc
import os
import pickle
import re
import resource
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Hashable

from ..errors import ModelError
from ..memory_budget import address_space_bytes, available_bytes

_GLOG_PREFIX = re.compile(r"^[IWEF]\d{4,8} [\d:.]+\s+\d+ ([^\]]+)\] ")


class CaffeFailure(Exception):
    """The child failed; ``str()`` is the most useful line Caffe or Python printed."""


def _summarise(stderr: str, fallback: str) -> str:
    """Prefer Caffe's fatal check, then a Python exception line, then the fallback."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith("F") and _GLOG_PREFIX.match(ln)]
    if fatal:
        where = _GLOG_PREFIX.match(fatal[-1]).group(1)  # type: ignore[union-attr]
        return f"{_GLOG_PREFIX.sub('', fatal[-1])} ({where})"
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return errors[-1] if errors else fallback


def describe_exception(exc: BaseException) -> str:
    """``Type: message``, plus where it was raised when that is outside hybrid_infer (the
    user's Python layer, say): the line the user has to look at."""
    text = f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f"{os.sep}hybrid_infer{os.sep}" not in f.filename]
    if frames:
        text += f" (raised in {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}, {frames[-1].name})"
    return text


def _limit_memory() -> None:
    """Cap the child's address space at what the machine has available, so that a net too
    large for it makes Caffe's allocation fail (an abort, reported with its message) rather
    than wake the kernel's OOM killer, which may pick another process."""
    available = available_bytes()
    if available is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = address_space_bytes() + available
    if soft == resource.RLIM_INFINITY or limit < soft:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def caffe_errors(where: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with a rehearsal's ``CaffeFailure`` and any exception raised through
    Caffe's forward (a Python layer's own) as ``ModelError`` naming ``where``."""
    try:
        return fn(*args)
    except CaffeFailure as exc:
        raise ModelError(f"{where}: Caffe failed: {exc}") from None
    except Exception as exc:
        raise ModelError(f"{where}: a layer raised {describe_exception(exc)}") from None


def call_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """Return ``fn(*args)`` computed in a forked child; raise CaffeFailure if it fails.

    The result travels back pickled: return small things (``None`` for a rehearsal).
    The child's standard output is discarded (a Python layer's prints are the parent's
    to show, once); its standard error is read for Caffe's message.
    """
    sys.stdout.flush()  # or the child would inherit, and could repeat, unwritten output
    sys.stderr.flush()
    result_r, result_w = os.pipe()
    err_r, err_w = os.pipe()
    # The child must never collect the parent's garbage: an ONNX Runtime session in it would
    # wait forever, in its destructor, for thread-pool threads that only the parent has.
    collecting, pid = gc.isenabled(), -1
    gc.disable()
    try:
        pid = os.fork()
    finally:
        if pid != 0 and collecting:
            gc.enable()
    if pid == 0:  # child: never return into the caller's stack
        status = 0
        try:
            os.close(result_r)
            os.close(err_r)
            os.dup2(err_w, 2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            _limit_memory()
            faulthandler.disable()  # Caffe's abort is expected here; its message is in stderr
            try:
                payload = pickle.dumps(("ok", fn(*args)))
            except BaseException as exc:  # report everything, the parent decides
                payload = pickle.dumps(("error", describe_exception(exc)))
            with os.fdopen(result_w, "wb") as out:
                out.write(payload)
        except BaseException:
            status = 70
        finally:
            os._exit(status)
    os.close(result_w)
    os.close(err_w)
    stderr_chunks: list[bytes] = []

    def drain() -> None:
        with os.fdopen(err_r, "rb") as err:
            stderr_chunks.append(err.read())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(result_r, "rb") as res:
        payload = res.read()
    _, wait_status = os.waitpid(pid, 0)
    reader.join()
    stderr = b"".join(stderr_chunks).decode(errors="replace")
    if payload:
        kind, value = pickle.loads(payload)
        if kind == "ok":
            return value
        raise CaffeFailure(_summarise(stderr, value))
    if os.WIFSIGNALED(wait_status):
        how = f"Caffe aborted ({signal.Signals(os.WTERMSIG(wait_status)).name})"
    else:
        how = f"Caffe exited with status {os.waitstatus_to_exitcode(wait_status)}"
    raise CaffeFailure(_summarise(stderr, how))


class Rehearsal:
    """Runs a Caffe net's step (reshape, copy inputs, forward) in a forked child the first
    time each set of input shapes is seen, and only then in this process.

    Caffe aborts on what it cannot do at forward or reshape time (stochastic pooling on
    the CPU, a Reshape whose fixed sizes no longer fit, a MemoryData layer never given
    data, ...). Rehearsed first, such a step raises ``CaffeFailure`` with Caffe's message
    instead of killing the user's process. Cost: one ``fork`` plus the step done twice, on
    the first run at each input shape only (scripts/bench_rehearsal.py measures it).
    Steps that fail only on some input values at an already rehearsed shape are not
    covered (Caffe layers rarely do; a Python layer's exceptions are not aborts).
    """

    def __init__(self) -> None:
        self._seen: set[Hashable] = set()

    def check(self, shapes: Hashable, step: Callable[[], None]) -> None:
        """Run ``step()`` in a child if ``shapes`` is new (raising ``CaffeFailure`` if it dies
        there); the caller then does the work in this process."""
        if shapes not in self._seen:
            call_isolated(step)
            self._seen.add(shapes)

    def run(self, shapes: Hashable, step: Callable[[], None]) -> None:
        """``step()`` here, after it survived in a child if ``shapes`` is new."""
        self.check(shapes, step)
        step()
