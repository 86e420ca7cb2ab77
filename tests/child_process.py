"""Run a test's function in a forked child that gave up root or most of its memory.

Some promises can only be seen from another user (a file or folder without permission;
root reads everything) or under a memory limit; the child reports what ``fn`` raised to
the parent, which asserts on it.
"""
from __future__ import annotations

import os
import resource
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

NOBODY = 65534


def run_in_child(fn: Callable[[], object], *, as_nobody: bool = False,
                 extra_address_space: Optional[int] = None) -> str:
    """``"Type: message"`` of what ``fn()`` raised in the child, or ``"no error"``.

    ``as_nobody``: the child switches to user and group nobody first (needs root).
    ``extra_address_space``: the child's address space may grow by that many bytes only.
    """
    from hybrid_infer.memory_budget import address_space_bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        message = "no error"
        try:
            if as_nobody:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            if extra_address_space is not None:
                limit = address_space_bytes() + extra_address_space
                resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
            fn()
        except BaseException as exc:  # reported to the parent, which asserts on it
            message = f"{type(exc).__name__}: {exc}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


@contextmanager
def public_folder() -> Iterator[Path]:
    """A new folder another user can reach (pytest's own are private to root), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="hybrid_infer_test_"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
