"""What CPU engines run on: the processor's model name, its vector extensions, the threads allowed.

Read from Linux's ``/proc/cpuinfo`` and the process's CPU affinity, so the figures are the
ones that decide engine speed here: they key cached engine choices (a choice measured on
one CPU or thread count is not reused on another) and head benchmark tables.
"""
from __future__ import annotations

import functools
import os
import platform

#: The vector and matrix extensions that decide which kernels CPU engines pick (FP32 on
#: AVX2/AVX-512, BF16 on avx512_bf16 or AMX, INT8 on VNNI/AMX).
FEATURES_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                        "amx_tile", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The processor's marketing name, e.g. "AMD EPYC" or "Intel(R) Xeon(R) Platinum 8480+"."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """Which of ``FEATURES_OF_INTEREST`` this CPU has, in that order."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in FEATURES_OF_INTEREST if f in flags]


def allowed_threads() -> int:
    """CPUs this process may run on (its affinity mask; ``taskset`` and containers narrow it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe() -> str:
    """One line for reports, e.g. "AMD EPYC, 2 CPUs allowed, avx2 fma avx512f avx512_bf16"."""
    return f"{cpu_model()}, {allowed_threads()} CPU(s) allowed, features: {' '.join(cpu_features()) or 'none listed'}"
