"""Run a pycaffe call in a forked child so that Caffe's fatal checks cannot kill us.

Caffe reports most model errors (bad layer parameters, weights of the wrong shape) with
glog ``CHECK`` failures that abort the whole process. Doing the first instantiation of a
user's model in a child turns such an abort into an exception carrying Caffe's message.
"""
from __future__ import annotations

import faulthandler
import gc
import os
import pickle
import re
import signal
import threading
from typing import Any, Callable

_GLOG_PREFIX = re.compile(r"^[IWEF]\d{4,8} [\d:.]+\s+\d+ [^\]]+\] ")


class CaffeFailure(Exception):
    """The child failed; ``str()`` is the most useful line Caffe or Python printed."""


def _summarise(stderr: str, fallback: str) -> str:
    """Prefer Caffe's fatal check, then a Python exception line, then the fallback."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith("F") and _GLOG_PREFIX.match(ln)]
    if fatal:
        return _GLOG_PREFIX.sub("", fatal[-1])
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return errors[-1] if errors else fallback


def call_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """Return ``fn(*args)`` computed in a forked child; raise CaffeFailure if it fails."""
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
            faulthandler.disable()  # Caffe's abort is expected here; its message is in stderr
            try:
                payload = pickle.dumps(("ok", fn(*args)))
            except BaseException as exc:  # report everything, the parent decides
                payload = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
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
