"""On-disk cache of built TensorRT engines, so a model is built once per machine.

An entry is two files named by its key: ``<key>.plan`` (the plan, as TensorRT wrote it)
and ``<key>.json`` (a sidecar with the plan's size and SHA-256 and the ``BuiltEngine``
metadata). The key hashes everything that changes the plan: the ONNX bytes, the build
settings, the TensorRT module and version, and the target (the GPU for data-center
TensorRT; the compute-capability list for TensorRT-RTX, whose builds need no GPU).

Both files are written to a temporary name and moved into place with ``os.replace``,
plan first, so a reader never sees half a file under a final name, and the sidecar
appears only once its plan is complete. A plan is checked against its sidecar before it
is returned: deserializing a corrupt plan can crash TensorRT, so a mismatch is reported
as a miss and the engine is rebuilt over it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import onnx

from ..errors import EnvironmentProblem
from . import trt_api
from .tensorrt_build import BuildSettings, BuiltEngine, build_engine
from .trt_api import TrtApi

log = logging.getLogger("hybrid_infer.tensorrt")

CACHE_FORMAT = 1
ENV_DIR = "HYBRID_INFER_ENGINE_CACHE"


def default_directory() -> Path:
    """``$HYBRID_INFER_ENGINE_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/hybrid_infer/engines``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
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
        self.directory = Path(directory).expanduser() if directory else default_directory()

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
        """The cached engine for ``key`` if its plan matches its sidecar, else why not."""
        plan_path, meta_path = self._paths(key)

        def miss(reason: str) -> tuple[CacheLookup, None]:
            return CacheLookup(key, False, reason, plan_path), None

        if not meta_path.exists():
            return miss("not cached" if not plan_path.exists() else "incomplete entry (no sidecar)")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                return miss("sidecar from another cache format")
            expected_size, expected_sha = int(meta["plan_size"]), str(meta["plan_sha256"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return miss(f"unreadable sidecar ({exc.__class__.__name__})")
        try:
            plan = plan_path.read_bytes()
        except OSError:
            return miss("plan file missing")
        if len(plan) != expected_size:
            log.warning("engine cache: %s is truncated (%d of %d bytes); rebuilding",
                        plan_path, len(plan), expected_size)
            return miss(f"plan truncated ({len(plan)} of {expected_size} bytes)")
        if hashlib.sha256(plan).hexdigest() != expected_sha:
            log.warning("engine cache: %s does not match its checksum; rebuilding", plan_path)
            return miss("plan checksum mismatch (corrupt file)")
        try:
            built = BuiltEngine.from_metadata(plan, meta["engine"])
        except (KeyError, TypeError) as exc:
            return miss(f"unreadable sidecar ({exc.__class__.__name__})")
        return CacheLookup(key, True, "hit", plan_path), built

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
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomically(plan_path, built.plan)
            _write_atomically(meta_path, json.dumps(meta, indent=1).encode())
        except OSError as exc:
            raise EnvironmentProblem(f"cannot write the engine cache at {self.directory} ({exc}); "
                                     f"set {ENV_DIR} to a writable directory") from exc
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
        built = build_engine(onnx_bytes, settings, api=api, label=label)
        self.store(key, built)
        return built, lookup


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
