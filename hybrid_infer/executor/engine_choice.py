"""CPU engines for TensorRT segments, and ``--engine auto``'s choice among them by measurement.

Where no TensorRT runtime can execute, a TensorRT segment's ONNX runs in a CPU engine. No
one engine is fastest everywhere: measured on a 2-core Xeon, OpenVINO beat ONNX Runtime
clearly on GoogLeNet and AlexNet and lost narrowly on ResNet-50 at batch 1 and SqueezeNet
(issue 15). So ``auto`` builds every installed candidate for a segment, times them on random
inputs of the segment's own shapes (the user's batch), keeps the fastest and closes the
rest. The outcome is recorded (``ChoiceCache``, keyed by ONNX, shapes, engine versions, CPU
and threads), so later processes build only the winner.

``CANDIDATES`` is the table ``auto`` chooses from, in order of preference on a tie; an
engine (say ONNX Runtime's CUDA provider) is added by adding a row: its availability
check, version, precision and builder (what it runs on belongs in the choice's key, as
the CPU model and thread count do here).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import numpy as np

from ..analysis.timing import time_calls
from ..engines.base import Engine
from ..engines.choice_cache import ChoiceCache, EngineChoice, now
from ..engines.host_cpu import allowed_threads, cpu_model
from ..errors import EngineRejected

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("hybrid_infer")

#: More threads per engine than any machine this runs on has CPUs: a typing error.
MAX_THREADS = 4096
#: The engine name that asks for a measured choice per segment.
AUTO = "auto"
#: Timed runs per engine and block aim at this many seconds (within 2 and 10 runs).
MEASURE_BLOCK_S = 0.25
#: Blocks per engine, alternating between engines so that a burst of load from elsewhere
#: on the machine falls on every engine rather than on one; the better block counts.
MEASURE_BLOCKS = 2


@dataclass(frozen=True)
class CpuSettings:
    """How CPU engines run: ``threads`` (0: every CPU this process may use) and ``bf16``
    (OpenVINO computes in BF16: faster where the CPU has avx512_bf16 or AMX, reduced
    precision; inputs and outputs stay FP32)."""
    threads: int = 0
    bf16: bool = False

    def __post_init__(self) -> None:
        from .. import arguments
        from ..errors import OptionError
        arguments.integer(self.threads, "threads", 0, MAX_THREADS)
        if not isinstance(self.bf16, bool):
            raise OptionError(f"bf16 must be True or False, not {self.bf16!r}")
        if self.threads > allowed_threads():
            log.warning("%d threads per CPU engine on %d CPUs: the threads will wait for each other "
                        "(0 takes every CPU this process may use)", self.threads, allowed_threads())

    def resolved_threads(self) -> int:
        return self.threads or allowed_threads()


@dataclass(frozen=True)
class Candidate:
    """One engine ``auto`` may pick: whether it can run here (and why not), its version,
    the precision it computes in under given settings, and how to build it for a segment
    (``alone``: the segment is the net's only one, so nothing else competes for the cores;
    ``value_checked``: Caffe layer -> what its index input takes, for engines that report
    an out-of-range index as the user's error, see ``OnnxRuntimeEngine``)."""
    name: str
    available: Callable[[], tuple[bool, str]]
    version: Callable[[], str]
    precision: Callable[[CpuSettings], str]
    build: Callable[["onnx.ModelProto", CpuSettings, bool, Mapping[str, str]], Engine]


def _onnxruntime_available() -> tuple[bool, str]:
    return True, f"ONNX Runtime {_onnxruntime_version()}"


def _onnxruntime_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def _onnxruntime_build(model: "onnx.ModelProto", settings: CpuSettings, alone: bool,
                       value_checked: Mapping[str, str]) -> Engine:
    from ..engines.onnxruntime_engine import OnnxRuntimeEngine
    # Alone, its threads may spin between runs; beside other engines they must not.
    return OnnxRuntimeEngine(model, threads=settings.threads, idle_spin=alone, value_checked=value_checked)


def _openvino_available() -> tuple[bool, str]:
    from ..engines.openvino_engine import runtime_available
    return runtime_available()


def _openvino_version() -> str:
    from ..engines.openvino_engine import version
    return version()


def _openvino_build(model: "onnx.ModelProto", settings: CpuSettings, alone: bool,
                    value_checked: Mapping[str, str]) -> Engine:
    if value_checked:  # an index outside the table must stop the run, as in Caffe
        raise EngineRejected(f"OpenVINO gives zeros for an index outside an Embed table instead of stopping, so "
                             f"{', '.join(value_checked)} cannot run on it", list(value_checked))
    from ..engines.openvino_engine import OpenVinoEngine
    return OpenVinoEngine(model, threads=settings.threads, precision=_openvino_precision(settings))


def _openvino_precision(settings: CpuSettings) -> str:
    return "bf16" if settings.bf16 else "f32"


CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("onnxruntime", _onnxruntime_available, _onnxruntime_version, lambda s: "f32", _onnxruntime_build),
    Candidate("openvino", _openvino_available, _openvino_version, _openvino_precision, _openvino_build),
)}


def available_candidates() -> list[str]:
    """The names of the candidates that can run here, in table order."""
    return [name for name, c in CANDIDATES.items() if c.available()[0]]


def describe_choice(choice: EngineChoice, precisions: Mapping[str, str]) -> str:
    """E.g. "openvino, the fastest at batch 1: openvino 20.5 ms, onnxruntime 35.7 ms (measured now)"."""
    def name(engine: str) -> str:
        return engine + (f" ({precisions[engine].upper()})" if precisions.get(engine, "f32") != "f32" else "")
    timings = ", ".join(f"{name(e)} {ms:.3g} ms" for e, ms in sorted(choice.median_ms.items(), key=lambda i: i[1]))
    when = f"measured {choice.measured}, cached" if choice.cached else "measured now"
    return f"{name(choice.engine)}, the fastest at batch {choice.batch}: {timings} ({when})"


def measure(engines: Mapping[str, Engine], feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Ms per run of each engine on ``feeds``: the better of ``MEASURE_BLOCKS`` blocks' medians,
    blocks alternating between engines, each after a warm-up run. Load from other processes
    only ever adds time, so the better block is the one less disturbed."""
    first = {}
    for name, engine in engines.items():
        try:
            engine.run(feeds)  # shape-dependent set-up and allocations
        except EngineRejected as exc:  # the segment cannot run on it: say which engine failed
            exc.engines = [name]
            raise
        first[name] = time_calls(lambda e=engine: e.run(feeds), 1, 0).median
    runs = max(2, min(10, int(MEASURE_BLOCK_S / max(max(first.values()), 1e-6))))
    best = {name: float("inf") for name in engines}
    for _ in range(MEASURE_BLOCKS):
        for name, engine in engines.items():
            # The warm-up run absorbs the previous engine's threads winding down.
            best[name] = min(best[name], time_calls(lambda e=engine: e.run(feeds), runs, 1).median * 1e3)
    return best


class CandidateEngines:
    """Builds the engine of each TensorRT segment from ``CANDIDATES``: the one asked for by
    name, or for ``auto`` the fastest on the segment's shapes (``choice_cache`` remembers it)."""

    def __init__(self, settings: CpuSettings = CpuSettings(), choice_cache: Optional[ChoiceCache] = None):
        self.settings = settings
        self.choice_cache = choice_cache or ChoiceCache()

    def build(self, engine: str, model: "onnx.ModelProto", shapes: Mapping[str, tuple[int, ...]],
              alone: bool, value_checked: Mapping[str, str] = {}) -> tuple[Engine, Optional[str]]:
        """The engine for a segment, and for ``auto`` what was chosen and why.

        ``shapes``: the segment's input shapes by value id, batch first (what ``auto``
        measures on). Raises ``EngineRejected`` when the engine (for ``auto``: every
        available candidate; then with all their reasons and named layers) refuses the segment.
        """
        if engine != AUTO:
            return CANDIDATES[engine].build(model, self.settings, alone, value_checked), None
        return self._choose(model, shapes, alone)

    def _choose(self, model: "onnx.ModelProto", shapes: Mapping[str, tuple[int, ...]],
                alone: bool) -> tuple[Engine, str]:
        names = available_candidates()
        precisions = {n: CANDIDATES[n].precision(self.settings) for n in names}
        key = self.choice_cache.key({
            "onnx_sha256": hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest(),
            "shapes": {value: list(shape) for value, shape in shapes.items()},
            "engines": {n: [CANDIDATES[n].version(), precisions[n]] for n in names},
            "cpu": cpu_model(), "threads": self.settings.resolved_threads()})
        recorded = self.choice_cache.lookup(key, names)
        if recorded is not None:
            try:
                return (CANDIDATES[recorded.engine].build(model, self.settings, alone, {}),
                        describe_choice(recorded, precisions))
            except EngineRejected as exc:
                log.warning("the recorded engine choice %s now refuses the segment (%s); measuring again",
                            recorded.engine, exc)
        built: dict[str, Engine] = {}
        refused: dict[str, EngineRejected] = {}
        for name in names:
            try:
                built[name] = CANDIDATES[name].build(model, self.settings, alone, {})
            except EngineRejected as exc:
                refused[name] = exc
        if not built:
            raise EngineRejected("; ".join(str(exc) for exc in refused.values()),
                                 list(dict.fromkeys(layer for exc in refused.values() for layer in exc.caffe_layers)),
                                 engines=list(refused))
        if len(built) == 1:
            (name, engine), = built.items()
            reasons = "; ".join(str(exc) for exc in refused.values())
            return engine, f"{name}, the only engine that accepted the segment ({reasons})"
        rng = np.random.default_rng()
        feeds = {value: rng.standard_normal(shape).astype(np.float32) for value, shape in shapes.items()}
        log.info("measuring %s on a segment at shapes %s", ", ".join(built), dict(shapes))
        try:
            medians = measure(built, feeds)
        except EngineRejected:
            # One engine failed where another may not: an engine that fails at run time
            # here is not trusted to be right elsewhere, so the segment's layers move to Caffe.
            for engine in built.values():
                engine.close()
            raise
        winner = min(built, key=lambda n: medians[n])
        for name, engine in built.items():
            if name != winner:
                engine.close()
        choice = EngineChoice(winner, medians, next(iter(shapes.values()))[0] if shapes else 1, now())
        self.choice_cache.store(key, choice)
        return built[winner], describe_choice(choice, precisions)
