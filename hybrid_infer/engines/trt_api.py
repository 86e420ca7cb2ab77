"""Which TensorRT Python module is in use, and every difference between them we touch.

Users have the data-center ``tensorrt`` (10.x or 11.x) or ``tensorrt_rtx``; they share the
Python API for what hybrid_infer calls, but not all of it. This module is the only place
that knows the differences, so builder and runner code asks ``TrtApi`` instead of testing
versions. Differences are detected from the module itself (an enum member exists or it
does not), not from version numbers, so a point release that adds or drops a feature is
handled without edits here.

TensorRT routes every message through the first logger registered in the process and
ignores later ones, so each module gets exactly one logger, owned here and shared by
builders and runtimes; ``capture`` collects what one build or load said.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Any, Iterator

from ..errors import EnvironmentProblem, OptionError

MODULES = ("tensorrt", "tensorrt_rtx")
#: ``auto`` tries the data-center module first: where both are installed on a data-center
#: GPU, only it can execute engines (TensorRT-RTX refuses compute capability 9.0).
AUTO = "auto"
ENV_MODULE = "HYBRID_INFER_TENSORRT"

log = logging.getLogger("hybrid_infer.tensorrt")


@dataclass
class CapturedLog:
    """What TensorRT logged while a ``capture`` block ran, errors and warnings apart."""
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self, limit: int = 3) -> str:
        """The last few errors on one line each: TensorRT's final messages name the cause."""
        return " | ".join(m.strip().replace("\n", " ") for m in self.errors[-limit:])


def _make_logger(module: ModuleType) -> Any:
    """An ``ILogger`` subclass for ``module`` that forwards to Python logging and captures."""
    severity = module.ILogger.Severity

    class Logger(module.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            module.ILogger.__init__(self)
            self._lock = threading.Lock()
            self._captures: list[CapturedLog] = []

        def log(self, sev: Any, msg: str) -> None:
            if sev in (severity.INTERNAL_ERROR, severity.ERROR):
                log.debug("TensorRT error: %s", msg)
                with self._lock:
                    for c in self._captures:
                        c.errors.append(msg)
                    if not self._captures:
                        log.error("TensorRT: %s", msg)
            elif sev == severity.WARNING:
                log.debug("TensorRT warning: %s", msg)
                with self._lock:
                    for c in self._captures:
                        c.warnings.append(msg)
            elif sev == severity.INFO:
                log.debug("TensorRT: %s", msg)

        @contextlib.contextmanager
        def capture(self) -> Iterator[CapturedLog]:
            """Collect messages logged inside the block; errors are not printed, the caller
            turns them into one user-facing error."""
            captured = CapturedLog()
            with self._lock:
                self._captures.append(captured)
            try:
                yield captured
            finally:
                with self._lock:
                    self._captures.remove(captured)

    return Logger()


@dataclass(frozen=True)
class TrtApi:
    """One loaded TensorRT module and the features it has."""

    module: ModuleType
    name: str
    version: str
    logger: Any
    #: TensorRT-RTX: ahead-of-time builds without a GPU, JIT on the target, no 9.0 support.
    is_rtx: bool
    #: ``BuilderFlag.FP16`` exists (TensorRT 10). Without it (TensorRT 11, RTX) FP16 means
    #: converting the ONNX model to FP16 and building a strongly typed network.
    has_fp16_flag: bool
    has_tf32_flag: bool
    has_timing_iterations: bool
    has_optimization_level: bool
    #: ``IBuilderConfig.set_compute_capability`` and the ``ComputeCapability`` enum (RTX).
    has_compute_capabilities: bool
    has_progress_monitor: bool
    has_strongly_typed_flag: bool

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def fp16_via_onnx(self) -> bool:
        return not self.has_fp16_flag

    @property
    def always_strongly_typed(self) -> bool:
        """TensorRT 11 has no weak typing left; precision comes from the tensors' types."""
        return not self.has_fp16_flag and not self.is_rtx

    def network_flags(self, strongly_typed: bool) -> int:
        """Flags for ``Builder.create_network``: 0 is explicit batch on every supported
        version; STRONGLY_TYPED is requested when tensor types must be obeyed (FP16 ONNX)."""
        if strongly_typed and self.has_strongly_typed_flag:
            return 1 << int(self.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return 0

    def compute_capabilities(self) -> dict[str, Any]:
        """Compute capabilities this module can target, as "8.6" -> enum member."""
        if not self.has_compute_capabilities:
            return {}
        members = self.module.ComputeCapability.__members__
        return {f"{int(v.value) // 10}.{int(v.value) % 10}": v for k, v in members.items()
                if k.startswith("SM")}

    @staticmethod
    def layer_metadata(layer: Any) -> str:
        """A network layer's metadata ("[ONNX Layer: node]"); older 10.x lacks the field."""
        return str(getattr(layer, "metadata", "") or "")

    def describe(self) -> str:
        return f"{self.name} {self.version}"


def _inspect(module: ModuleType, name: str) -> TrtApi:
    flags = module.BuilderFlag.__members__
    config = module.IBuilderConfig
    return TrtApi(
        module=module,
        name=name,
        version=str(module.__version__),
        logger=_make_logger(module),
        is_rtx=name == "tensorrt_rtx",
        has_fp16_flag="FP16" in flags,
        has_tf32_flag="TF32" in flags,
        has_timing_iterations=hasattr(config, "avg_timing_iterations"),
        has_optimization_level=hasattr(config, "builder_optimization_level"),
        has_compute_capabilities=hasattr(config, "set_compute_capability")
        and hasattr(module, "ComputeCapability"),
        has_progress_monitor=hasattr(module, "IProgressMonitor")
        and hasattr(config, "progress_monitor"),
        has_strongly_typed_flag="STRONGLY_TYPED" in module.NetworkDefinitionCreationFlag.__members__,
    )


@lru_cache(maxsize=None)
def _load(name: str) -> TrtApi:
    if name not in MODULES:
        raise OptionError(f"unknown TensorRT module '{name}'; choose {AUTO}, "
                          f"{' or '.join(MODULES)}")
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise EnvironmentProblem(
            f"the TensorRT module '{name}' cannot be imported ({exc}); install it "
            f"(pip install {name.replace('_', '-')}) or choose the other one") from exc
    api = _inspect(module, name)
    if not api.is_rtx and api.major < 10:
        raise EnvironmentProblem(f"hybrid_infer needs TensorRT 10 or newer (name-based I/O and "
                                 f"execute_async_v3); found {api.describe()}: pip install -U tensorrt")
    return api


def load(name: str | None = None) -> TrtApi:
    """The TensorRT module ``name`` ("tensorrt", "tensorrt_rtx", or "auto" for whichever
    imports); ``None`` reads ``$HYBRID_INFER_TENSORRT`` and defaults to auto."""
    from_environment = not name and bool(os.environ.get(ENV_MODULE))
    name = name or os.environ.get(ENV_MODULE) or AUTO
    if from_environment and name != AUTO and name not in MODULES:
        raise OptionError(f"{ENV_MODULE}={name}: unknown TensorRT module; set it to {AUTO}, "
                          f"{' or '.join(MODULES)}, or unset it")
    if name != AUTO:
        return _load(name)
    problems = []
    for candidate in MODULES:
        try:
            return _load(candidate)
        except EnvironmentProblem as exc:
            problems.append(str(exc).split(";")[0])
    raise EnvironmentProblem(
        "no TensorRT Python module is importable (" + "; ".join(problems) + "); install "
        "tensorrt (data-center GPUs) or tensorrt-rtx (RTX GPUs) with pip, or use "
        "--engine onnxruntime")
