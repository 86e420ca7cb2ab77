"""Refuse work that cannot fit in memory before allocating it.

A batch or input size far beyond the machine (``--batch 100000``, ``--input-shape
data=1x3x30000x30000``) would otherwise end in a ``MemoryError`` from numpy, a
``std::bad_alloc`` abort inside Caffe, or the kernel's OOM killer taking the process
(and possibly others) down. Estimates are of activations: every blob of the net at the
batch in use, 4 bytes (FP32) per element; weights are already loaded when this is asked.
"""
from __future__ import annotations

import os
import resource
from typing import Optional

from .errors import InputError

GIB = 2**30


def _meminfo_kib(key: str, path: str = "/proc/meminfo") -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == key:
                    return int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None


def address_space_bytes() -> int:
    """This process's virtual memory size (``VmSize``), in bytes; 0 where unknown."""
    return (_meminfo_kib("VmSize", f"/proc/{os.getpid()}/status") or 0) * 1024


def available_bytes() -> Optional[int]:
    """Memory this process may still take, in bytes: the kernel's ``MemAvailable``, lowered to
    what an address-space limit (``ulimit -v``) leaves; None where neither is known."""
    limits = []
    avail = _meminfo_kib("MemAvailable")
    if avail is not None:
        limits.append(avail * 1024)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(max(0, soft - address_space_bytes()))
    return min(limits) if limits else None


def check_fits(nbytes: int, what: str, advice: str) -> None:
    """Raise ``InputError`` if ``nbytes`` exceeds what is available; ``what`` says what needs
    it ("running deploy.prototxt at batch 64"), ``advice`` what to change."""
    available = available_bytes()
    if available is not None and nbytes > available:
        raise InputError(f"{what} needs about {nbytes / GIB:.1f} GiB of memory; this machine has "
                         f"{available / GIB:.1f} GiB available: {advice}")
