"""On-disk cache of built TensorRT engines, so a model is built once per machine.

An entry is two files named by its key: ``<key>.plan`` (the plan, as TensorRT wrote it)
and ``<key>.json`` (a sidecar with the plan's size and SHA-256 and the ``BuiltEngine``
metadata). The key hashes everything that changes the plan: the ONNX bytes, the build
settings, the TensorRT module and version, and the target (the GPU for data-center
TensorRT; the compute-capability list for TensorRT-RTX, whose builds need no GPU).

Both files are written to a temporary name and moved into place with ``os.replace``,
plan first, so a reader never sees half a file under a final name, and the sidecar
appears only once its plan is complete. Everything found in the cache folder is
untrusted (another process, a crash or a person may have left anything there): a plan is
checked against its sidecar before it is returned, since deserializing a corrupt plan
can crash TensorRT, and an entry that is not two regular files of sane sizes is a miss;
the engine is then rebuilt over it, as is one whose plan could not fit in this process's
memory (a damaged sidecar claiming gigabytes; the plan is hashed in chunks, never held
whole before it is known good). A folder that cannot be written is reported before any
build; half-written entries that killed builds left behind are removed then
(``files.sweep_stale_temporaries``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

import onnx

from .. import arguments
from ..errors import EnvironmentProblem, HybridInferError
from ..memory_budget import available_bytes
from ..files import (expand_folder, open_regular_file, read_regular_file, sweep_stale_temporaries,
                     write_files_atomically)
from . import trt_api
from .tensorrt_build import BuildSettings, BuiltEngine, build_engine
from .trt_api import TrtApi

log = logging.getLogger("hybrid_infer.tensorrt")

CACHE_FORMAT = 1
ENV_DIR = "HYBRID_INFER_ENGINE_CACHE"
#: Limits on what is read from the cache: a sidecar is a few KiB, plans of large nets some
#: hundred MiB (AlexNet's 234 MiB); anything beyond is not an entry of this cache.
MAX_SIDECAR_BYTES = 64 * 2**20
MAX_PLAN_BYTES = 16 * 2**30
#: A half-written entry (``.KEY.plan.PID.XXXXXXXX.tmp``) older than this is a killed writer's:
#: writing an entry takes seconds.
STALE_TEMPORARY_S = 3600


def default_directory() -> Path:
    """``$HYBRID_INFER_ENGINE_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/hybrid_infer/engines``."""
    if os.environ.get(ENV_DIR):
        return expand_folder(os.environ[ENV_DIR], ENV_DIR)
    base = os.environ.get("XDG_CACHE_HOME") or expand_folder("~/.cache", "the home folder (HOME)")
    return Path(base) / "hybrid_infer" / "engines"


def build_target(api: TrtApi, settings: BuildSettings) -> str:
    """What the plan is built for, beyond the module: its validity on another machine."""
    if api.is_rtx:
        targets = list(settings.compute_capabilities) or ["default"]
        if "current" in targets:
            from .tensorrt_engine import current_gpu
            targets[targets.index("current")] = current_gpu().compute_capability
        return "rtx:" + ",".join(targets)
    from .tensorrt_engine import current_gpu
    gpu = current_gpu()
    return f"{gpu.name} (compute capability {gpu.compute_capability})"


@dataclass(frozen=True)
class CacheLookup:
    """The outcome of one lookup: ``hit``, and otherwise why not (shown in reports)."""
    key: str
    hit: bool
    reason: str
    plan_path: Path


class EngineCache:
    """A directory of plans keyed by content; safe to share between processes."""

    def __init__(self, directory: Union[str, os.PathLike[str], None] = None) -> None:
        self.directory = (expand_folder(arguments.path(directory, "engine cache directory"),
                                        "engine cache directory") if directory is not None else default_directory())

    def key(self, onnx_bytes: bytes, settings: BuildSettings, api: TrtApi, target: str) -> str:
        material = {
            "format": CACHE_FORMAT,
            "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "settings": settings.as_dict(),
            "module": api.name,
            "module_version": api.version,
            "target": target,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.plan", self.directory / f"{key}.json"

    def lookup(self, key: str) -> tuple[CacheLookup, Optional[BuiltEngine]]:
        """The cached engine for ``key`` if its plan matches its sidecar, else why not.

        Never raises: whatever is on disk is untrusted, and anything unusable is a miss
        (the entry is then rebuilt over). Both files must be regular files, not links
        (opened without following them, and without blocking on a FIFO); their sizes are
        checked before they are read, the sidecar's fields have the right types, and the
        plan has the size and SHA-256 the sidecar records.
        """
        plan_path, meta_path = self._paths(key)

        def miss(reason: str) -> tuple[CacheLookup, None]:
            return CacheLookup(key, False, reason, plan_path), None

        if not _exists(meta_path):
            return miss("not cached" if not _exists(plan_path) else "incomplete entry (no sidecar)")
        try:
            meta = json.loads(read_regular_file(meta_path, "sidecar", _Unusable, max_bytes=MAX_SIDECAR_BYTES,
                                                follow_symlinks=False))
            if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                return miss("sidecar from another cache format")
            expected_size, expected_sha = meta.get("plan_size"), meta.get("plan_sha256")
            if (not isinstance(expected_size, int) or isinstance(expected_size, bool)
                    or not 0 < expected_size <= MAX_PLAN_BYTES or not isinstance(expected_sha, str)):
                return miss("unreadable sidecar (plan size or checksum missing or of the wrong type)")
        except (_Unusable, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
            return miss(f"unreadable sidecar ({exc})")
        available = available_bytes()
        if available is not None and 2 * expected_size > available:  # the plan, then TensorRT's copy
            log.warning("engine cache: %s claims a plan of %d bytes, more than this process can hold; "
                        "rebuilding", meta_path, expected_size)
            return miss(f"plan of {expected_size} bytes does not fit in memory")
        try:
            with open_regular_file(plan_path, "plan", _Unusable, follow_symlinks=False) as f:
                size = os.fstat(f.fileno()).st_size
                if size != expected_size:
                    log.warning("engine cache: %s is %d bytes, its sidecar says %d; rebuilding",
                                plan_path, size, expected_size)
                    return miss(f"plan truncated or replaced ({size} of {expected_size} bytes)")
                # Checked in chunks first, so that a damaged plan never has to fit in memory.
                if _sha256_of(f, expected_size + 1) != expected_sha:
                    log.warning("engine cache: %s does not match its checksum; rebuilding", plan_path)
                    return miss("plan checksum mismatch (corrupt file)")
                f.seek(0)
                plan = f.read(expected_size + 1)
        except (_Unusable, OSError) as exc:
            return miss(f"plan unusable ({exc})")
        except MemoryError:
            return miss(f"plan of {expected_size} bytes does not fit in memory")
        if len(plan) != expected_size or hashlib.sha256(plan).hexdigest() != expected_sha:
            return miss("plan changed while read")
        try:
            built = BuiltEngine.from_metadata(plan, meta.get("engine"))
        except ValueError as exc:
            return miss(f"unreadable sidecar ({exc})")
        return CacheLookup(key, True, "hit", plan_path), built

    def check_directory(self) -> None:
        """Make sure the cache folder exists and can be written, before minutes of building:
        raises ``EnvironmentProblem`` saying how to choose another."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            usable = self.directory.is_dir() and os.access(self.directory, os.R_OK | os.W_OK | os.X_OK)
            problem = "" if usable else "not a writable folder"
        except OSError as exc:
            problem = exc.strerror or str(exc)
        if problem:
            raise EnvironmentProblem(f"engine cache {self.directory}: {problem}; pass --engine-cache DIR or "
                                     f"set {ENV_DIR} to a writable folder")
        sweep_stale_temporaries(self.directory, STALE_TEMPORARY_S)

    def store(self, key: str, built: BuiltEngine) -> Path:
        """Write the entry atomically (plan, then sidecar); return the plan's path."""
        plan_path, meta_path = self._paths(key)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "plan_size": built.plan_size,
            "plan_sha256": hashlib.sha256(built.plan).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "engine": built.metadata(),
        }
        self.check_directory()
        write_files_atomically({plan_path: built.plan, meta_path: json.dumps(meta, indent=1).encode()},
                               option="engine cache entry", error=EnvironmentProblem, owned_folder=True)
        return plan_path

    def get_or_build(self, onnx_model: Union[onnx.ModelProto, bytes],
                     settings: BuildSettings = BuildSettings(), *, api: Optional[TrtApi] = None,
                     label: str = "segment") -> tuple[BuiltEngine, CacheLookup]:
        """The engine for ``onnx_model`` from the cache, or built now and stored."""
        api = api or trt_api.load()
        onnx_bytes = (onnx_model if isinstance(onnx_model, bytes)
                      else onnx_model.SerializeToString(deterministic=True))
        key = self.key(onnx_bytes, settings, api, build_target(api, settings))
        lookup, built = self.lookup(key)
        if built is not None:
            log.info("%s: engine cache hit (%s)", label, lookup.plan_path)
            return built, lookup
        log.info("%s: engine cache miss: %s", label, lookup.reason)
        self.check_directory()
        built = build_engine(onnx_bytes, settings, api=api, label=label)
        self.store(key, built)
        return built, lookup


def _sha256_of(f: BinaryIO, limit: int) -> str:
    """SHA-256 of at most ``limit`` bytes of ``f``, read in 1 MiB chunks."""
    digest, left = hashlib.sha256(), limit
    while left > 0:
        chunk = f.read(min(left, 2**20))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


class _Unusable(HybridInferError):
    """A cache file that cannot be used (internal: turned into a miss)."""


def _exists(path: Path) -> bool:
    """Whether anything (a dangling link included) stands at ``path``; errors count as "no"."""
    try:
        os.lstat(path)
    except OSError:
        return False
    return True
