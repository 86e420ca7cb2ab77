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

import atexit
import ctypes
import faulthandler
import gc
import os
import pickle
import re
import resource
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Hashable

from ..errors import ModelError
from ..memory_budget import address_space_bytes, available_bytes

_GLOG_PREFIX = re.compile(r"^[IWEF]\d{4,8} [\d:.]+\s+\d+ ([^\]]+)\] ")
_PYTHON_FRAME = re.compile(r'^File "([^"]+)", line (\d+)')
#: Linux's prctl option that sends a process a signal when its parent dies.
_PR_SET_PDEATHSIG = 1
#: How long the parent keeps reading a pipe after the child exited, for what a process the
#: child started (and that holds the pipe open) keeps writing.
_DRAIN_AFTER_EXIT_S = 1.0


class CaffeFailure(Exception):
    """The child failed; ``str()`` is the most useful line Caffe or Python printed."""


def _summarise(stderr: str, fallback: str) -> str:
    """Prefer Caffe's fatal check, then a Python exception line (with the file and line of
    the traceback frame printed just before it, which for a SyntaxError is the user's
    module), then the fallback."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith("F") and _GLOG_PREFIX.match(ln)]
    if fatal:
        where = _GLOG_PREFIX.match(fatal[-1]).group(1)  # type: ignore[union-attr]
        return f"{_GLOG_PREFIX.sub('', fatal[-1])} ({where})"
    errors = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    if not errors:
        return fallback
    frames = [_PYTHON_FRAME.match(ln) for ln in lines[:errors[-1]]]
    frame = next((f for f in reversed(frames) if f), None)
    where = f" (in {os.path.basename(frame.group(1))}:{frame.group(2)})" if frame else ""
    return lines[errors[-1]] + where


def _message(exc: BaseException) -> str:
    """``str(exc)`` on one line; an exception whose ``__str__`` itself fails is named by its type."""
    try:
        text = str(exc)
    except Exception as inner:  # the user's exception class may break in any way
        text = f"(its message cannot be shown: str() raised {type(inner).__name__})"
    return " ".join(text.split())


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` on one line, plus where it was raised when that is outside
    hybrid_infer (the user's Python layer, say): the line the user has to look at."""
    text = f"{type(exc).__name__}: {_message(exc)}"
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


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this (child) process when its parent dies (Linux's
    PR_SET_PDEATHSIG), so that a parent killed outright (SIGKILL) leaves no orphan."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's finally still kills the child
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(70)


#: The argument of the child's last ``sys.exit`` call (the first item: ``sys.exit`` not called).
_exit_argument: list[Any] = []


def _recording_exit(code: Any = None) -> None:
    """The child's ``sys.exit``: remembers ``code`` for ``_end_without_finalizing``."""
    _exit_argument[:] = [code]
    raise SystemExit(code)


def _end_without_finalizing() -> None:
    """The child's only ``atexit`` callback, run when something in it ends the interpreter
    (a Python layer's module calling ``sys.exit``, which Caffe reports with ``PyErr_Print``
    and Python turns into ``Py_Exit``): end the process now, with the status Python would
    give. Finalizing a forked child tears down objects the parent's libraries made, whose
    worker threads did not survive the fork (OpenVINO's CPU stream executor then waits
    forever for them). A ``SystemExit`` raised directly, not through ``sys.exit``, ends it
    with status 1."""
    code = _exit_argument[0] if _exit_argument else 1
    os._exit(0 if code is None else code & 0xFF if isinstance(code, int) else 1)


def caffe_errors(where: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with a rehearsal's ``CaffeFailure`` and any exception raised through
    Caffe's forward (a Python layer's own) as ``ModelError`` naming ``where``."""
    try:
        return fn(*args)
    except CaffeFailure as exc:
        raise ModelError(f"{where}: Caffe failed: {exc}") from None
    except Exception as exc:
        raise ModelError(f"{where}: a layer raised {describe_exception(exc)}") from None


def _child(fn: Callable[..., Any], args: tuple, parent: int, result_w: int, err_w: int,
           closed: tuple[int, ...]) -> None:
    """The forked child: its own process group (a Ctrl-C at the terminal goes to the parent,
    which ends the child), killed with its parent, standard input and output on /dev/null,
    standard error into ``err_w``; the pickled outcome of ``fn(*args)`` into ``result_w``."""
    status = 0
    try:
        os.setpgid(0, 0)
        _die_with_parent(parent)
        for fd in closed:
            os.close(fd)
        os.dup2(err_w, 2)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        # What Python prints (Boost.Python's report of a layer module's SyntaxError) must reach
        # the pipe too, also where sys.stderr was something else (a test runner's capture).
        sys.stderr = open(2, "w", buffering=1, errors="replace", closefd=False)
        _limit_memory()
        faulthandler.disable()  # Caffe's abort is expected here; its message is in stderr
        sys.exit = _recording_exit
        atexit.register(_end_without_finalizing)
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


def _read_until_exit(fd: int, exited: threading.Event, chunks: list[bytes]) -> None:
    """Read ``fd`` until end of file, or until the child has exited and nothing more is
    waiting: a process the child started may hold the pipe open long after it (a Python
    layer's helper), and end of file would then never come."""
    deadline = None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        while True:
            if exited.is_set() and deadline is None:
                deadline = time.monotonic() + _DRAIN_AFTER_EXIT_S
            if poller.poll(50):
                data = os.read(fd, 1 << 16)
                if not data:
                    return
                chunks.append(data)
            elif deadline is not None:
                return
            if deadline is not None and time.monotonic() > deadline:
                return
    finally:
        os.close(fd)


def _end_group(pid: int) -> None:
    """Kill whatever is left of the child's process group (the child, if an interrupt
    stopped the wait; processes a Python layer started in it)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def call_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """Return ``fn(*args)`` computed in a forked child; raise CaffeFailure if it fails.

    The result travels back pickled: return small things (``None`` for a rehearsal).
    The child's standard output is discarded (a Python layer's prints are the parent's
    to show, once); its standard error is read for Caffe's message. The parent waits for
    the child's exit, not for its pipes to close (a process the child started may keep
    them open), and on any way out (Ctrl-C, SIGTERM) kills the child's process group, so
    neither a rehearsal nor anything it started outlives the call.
    """
    sys.stdout.flush()  # or the child would inherit, and could repeat, unwritten output
    sys.stderr.flush()
    result_r, result_w = os.pipe()
    err_r, err_w = os.pipe()
    parent = os.getpid()
    # The child must never collect the parent's garbage: an ONNX Runtime session in it would
    # wait forever, in its destructor, for thread-pool threads that only the parent has.
    collecting, pid = gc.isenabled(), -1
    gc.disable()
    try:
        pid = os.fork()
    finally:
        if pid != 0 and collecting:
            gc.enable()
    if pid == 0:  # child: never returns into the caller's stack
        _child(fn, args, parent, result_w, err_w, (result_r, err_r))
    os.close(result_w)
    os.close(err_w)
    try:
        os.setpgid(pid, pid)  # also here, so that _end_group cannot miss a child not yet there
    except OSError:
        pass
    exited = threading.Event()
    chunks: dict[int, list[bytes]] = {result_r: [], err_r: []}
    readers = [threading.Thread(target=_read_until_exit, args=(fd, exited, chunks[fd]), daemon=True)
               for fd in (result_r, err_r)]
    for reader in readers:
        reader.start()
    reaped = False
    try:
        _, wait_status = os.waitpid(pid, 0)
        reaped = True
    finally:
        exited.set()
        _end_group(pid)
        if not reaped:
            os.waitpid(pid, 0)
        for reader in readers:
            reader.join()
    payload = b"".join(chunks[result_r])
    stderr = b"".join(chunks[err_r]).decode(errors="replace")
    if payload:
        kind, value = pickle.loads(payload)
        if kind == "ok":
            return value
        raise CaffeFailure(_summarise(stderr, value))
    if os.WIFSIGNALED(wait_status):
        how = f"Caffe aborted ({signal.Signals(os.WTERMSIG(wait_status)).name})"
    else:
        how = (f"the process ended (exit status {os.waitstatus_to_exitcode(wait_status)}) before Caffe "
               "finished, without an error message; a Python layer (or its module) calling sys.exit() or "
               "os._exit() ends it this way")
    raise CaffeFailure(_summarise(stderr, how))


#: Whether Caffe has run in GPU mode in this process (see ``Rehearsal.check``).
_caffe_on_gpu = False


def note_caffe_on_gpu() -> None:
    """Record that Caffe runs on a GPU in this process from now on: its CUDA context and
    device memory do not survive ``fork``, so later rehearsals are skipped."""
    global _caffe_on_gpu
    _caffe_on_gpu = True


class Rehearsal:
    """Runs a Caffe net's step (reshape, copy inputs, forward) in a forked child the first
    time each set of input shapes is seen, and only then in this process.

    Caffe aborts on what it cannot do at forward or reshape time (stochastic pooling on
    the CPU, a Reshape whose fixed sizes no longer fit, a MemoryData layer never given
    data, ...). Rehearsed first, such a step raises ``CaffeFailure`` with Caffe's message
    instead of killing the user's process. Cost: one ``fork`` plus the step done twice, on
    the first run at each input shape only (scripts/bench_rehearsal.py measures it).
    A net holding a layer that aborts on some input *values* (BatchReindex's index CHECK,
    ``caffe_limits.VALUE_CHECKED_TYPES``) is made with ``every_run=True`` and rehearsed at
    every run instead (a Python layer's exceptions are not aborts: they need no rehearsal).
    """

    def __init__(self, every_run: bool = False) -> None:
        self._seen: set[Hashable] = set()
        self._every_run = every_run

    def check(self, shapes: Hashable, step: Callable[[], None]) -> None:
        """Run ``step()`` in a child if ``shapes`` is new, or at every call with ``every_run``
        (raising ``CaffeFailure`` if it dies there); the caller then does the work here.
        Not once Caffe has run on a GPU in this process (``note_caffe_on_gpu``): a net's
        blobs may then live in device memory, which a forked child cannot reach."""
        if _caffe_on_gpu:
            return
        if self._every_run or shapes not in self._seen:
            call_isolated(step)
            self._seen.add(shapes)

    def run(self, shapes: Hashable, step: Callable[[], None]) -> None:
        """``step()`` here, after it survived in a child if ``shapes`` is new."""
        self.check(shapes, step)
        step()
