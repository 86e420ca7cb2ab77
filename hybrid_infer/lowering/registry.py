"""One registration per lowering: the Caffe layer it lowers, when it cannot, and how it emits ONNX.

Every lowering, built in or the user's, is declared once with ``register_lowering``::

    @register_lowering("ReLU6", check=check_relu6)
    def lower_relu6(ctx, layer, inputs, outputs): ...

    @register_lowering("Python", python_module="my_layers", python_layer="HardSwish")
    def lower_hard_swish(ctx, layer, inputs, outputs): ...

The ``tensorrt`` capability profile is derived from these registrations (a layer may go to
TensorRT exactly when a lowering is registered for it and its check passes), so what the
partitioner sends to TensorRT and what the lowering can emit cannot drift apart. This is
the split torch.fx draws between operator support and partitioning, with the check
declared beside its converter as Torch-TensorRT declares a capability validator.

A registration that targets a layer another registration already covers is refused with
an error naming both, unless it asks to replace it (``replace=True``).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from ..errors import HybridInferError, LoweringError, OptionError

if TYPE_CHECKING:
    from ..graph.layer_graph import Layer, LayerGraph
    from .context import LoweringContext

#: ``lower(ctx, layer, inputs, outputs)``: emit the ONNX nodes computing ``outputs`` (value
#: ids, in the order of the layer's tops) from ``inputs`` (value ids, the layer's bottoms).
LowerFn = Callable[["LoweringContext", "Layer", list[str], list[str]], None]
#: ``check(layer, graph)``: None when the lowering can handle this layer, else the reason it
#: cannot (shown in the partition report; the layer then runs in Caffe).
Check = Callable[["Layer", "LayerGraph"], Optional[str]]

BUILT_IN = "built-in"
#: The package name under which lowering modules given as file paths are imported.
USER_FILE_MODULES = "hybrid_infer_user_lowerings."


@dataclass(frozen=True)
class LoweringTarget:
    """What a lowering lowers: a Caffe layer type, or one Python layer class.

    Python layers (``type: "Python"``) are told apart by ``python_param { module layer }``, so
    each Python layer class gets its own lowering.
    """
    layer_type: str
    python_module: Optional[str] = None
    python_layer: Optional[str] = None

    @staticmethod
    def of(layer: "Layer") -> "LoweringTarget":
        """The target a layer of the graph matches."""
        if layer.type == "Python":
            p = layer.param.python_param
            return LoweringTarget("Python", p.module, p.layer)
        return LoweringTarget(layer.type)

    def __str__(self) -> str:
        if self.layer_type == "Python":
            return f"Python layer {self.python_module}.{self.python_layer}"
        return self.layer_type


@dataclass(frozen=True)
class Registration:
    """A registered lowering: its target, emit function, optional check, and where it came from.

    ``origin`` is ``"built-in"`` for hybrid_infer's own lowerings; otherwise it says how the
    user's code arrived (``--lowerings MODULE``, an installed entry point, or the module that
    called the decorator), so reports can say which lowerings are not hybrid_infer's.
    """
    target: LoweringTarget
    lower: LowerFn
    check: Optional[Check]
    origin: str

    @property
    def built_in(self) -> bool:
        return self.origin == BUILT_IN

    def refusal(self, layer: "Layer", graph: "LayerGraph") -> Optional[str]:
        """Why this lowering cannot take ``layer`` (its check's answer), or None.

        A check that raises, or answers anything but None or a non-empty string, refuses
        the layer with a reason saying so: the layer then runs in Caffe, never wrongly.
        """
        if self.check is None:
            return None
        try:
            reason = self.check(layer, graph)
        except HybridInferError as exc:
            return str(exc)
        except Exception as exc:  # the user's code: report it, keep the run going
            return f"the check of {self.describe()} raised {type(exc).__name__}: {exc}"
        if reason is None or (isinstance(reason, str) and reason):
            return reason
        return (f"the check of {self.describe()} returned {reason!r}; a check returns None (the layer can "
                "be lowered) or the reason it cannot, as a string")

    def emit(self, ctx: "LoweringContext", layer: "Layer", inputs: list[str], outputs: list[str]) -> None:
        """Run the lowering; any exception but a LoweringError becomes one naming the layer and
        this lowering, so the layer moves to Caffe instead of the run failing."""
        try:
            self.lower(ctx, layer, inputs, outputs)
        except LoweringError:
            raise
        except Exception as exc:
            raise LoweringError(layer.name, layer.type,
                                f"{self.describe()} raised {type(exc).__name__}: {exc}") from exc

    def describe(self) -> str:
        """``module.function (origin)``; a function from a ``.py`` file given by path is named
        by itself, since the origin already gives the file."""
        module = self.lower.__module__
        name = self.lower.__qualname__ if module.startswith(USER_FILE_MODULES) else f"{module}.{self.lower.__qualname__}"
        return f"{name} ({self.origin})"


class LoweringClash(OptionError):
    """Two lowerings were registered for the same layer without ``replace=True``."""


class LoweringRegistry:
    """The registrations in force, by target. Thread-safe; lookups and registrations load the
    built-in lowerings and the installed entry points first (see ``lowering.plugins``), so a
    user registration always meets the built-in one it may clash with or replace."""

    def __init__(self) -> None:
        self._by_target: dict[LoweringTarget, Registration] = {}
        #: Every registration ever made, with its ``replace`` flag, so that a module named
        #: again after ``scope()`` undid its registrations gets them back.
        self._history: list[tuple[Registration, bool]] = []
        self._lock = threading.RLock()
        self._origin_stack: list[str] = []

    def add(self, registration: Registration, *, replace: bool = False) -> None:
        """Register; raises LoweringClash when the target is taken and ``replace`` is False.

        The same function registered again changes nothing; a function of the same module
        and name (a notebook cell run again, ``importlib.reload``) replaces the old one.
        """
        with self._lock:
            self._install(registration, replace)
            self._history.append((registration, replace))

    def _install(self, registration: Registration, replace: bool) -> None:
        old = self._by_target.get(registration.target)
        if old is not None and not replace and old.lower is not registration.lower:
            redefined = (old.lower.__module__, old.lower.__qualname__) == \
                        (registration.lower.__module__, registration.lower.__qualname__)
            if not redefined:
                raise LoweringClash(
                    f"two lowerings for {registration.target}: {old.describe()} and "
                    f"{registration.describe()}; pass replace=True to register_lowering to replace "
                    "the first one deliberately")
        self._by_target[registration.target] = registration

    def restore_module(self, module: str, origin: Optional[str] = None) -> int:
        """Put back what module ``module`` (or anything imported under ``origin``) registered,
        after ``scope()`` undid it; returns how many registrations that is."""
        with self._lock:
            entries = [(r, replace) for r, replace in self._history
                       if r.lower.__module__ == module or (origin is not None and r.origin == origin)]
            for registration, replace in entries:
                self._install(registration, replace)
            return len(entries)

    def replaced_built_in(self, target: LoweringTarget) -> bool:
        """Whether a built-in lowering of ``target`` exists but is not the one in force."""
        with self._lock:
            current = self._by_target.get(target)
            return current is not None and not current.built_in and any(
                r.built_in and r.target == target for r, _ in self._history)

    def find(self, layer: "Layer") -> Optional[Registration]:
        """The registration that lowers ``layer``, or None."""
        _load_plugins()
        return self._by_target.get(LoweringTarget.of(layer))

    def registrations(self) -> list[Registration]:
        """Every registration in force, built-in ones first, then in target order."""
        _load_plugins()
        with self._lock:
            return sorted(self._by_target.values(), key=lambda r: (not r.built_in, str(r.target)))

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Undo, on leaving the block, every registration made or replaced inside it (to try a
        lowering in a notebook or a test without changing the process for good)."""
        _load_plugins()
        with self._lock:
            saved = dict(self._by_target)
        try:
            yield
        finally:
            with self._lock:
                self._by_target = saved

    @contextlib.contextmanager
    def origin(self, origin: str) -> Iterator[None]:
        """Attribute registrations made inside the block (by importing a module) to ``origin``."""
        with self._lock:
            self._origin_stack.append(origin)
        try:
            yield
        finally:
            with self._lock:
                self._origin_stack.pop()

    def current_origin(self, lower: LowerFn) -> str:
        """Where a registration made now comes from."""
        if self._origin_stack:
            return self._origin_stack[-1]
        if lower.__module__.startswith("hybrid_infer.lowering."):
            return BUILT_IN
        return f"registered by module {lower.__module__}"


REGISTRY = LoweringRegistry()


def _load_plugins() -> None:
    from .plugins import load_builtins_and_entry_points
    load_builtins_and_entry_points()


def register_lowering(layer_type: str, *, python_module: Optional[str] = None,
                      python_layer: Optional[str] = None, check: Optional[Check] = None,
                      replace: bool = False) -> Callable[[LowerFn], LowerFn]:
    """Decorator: register ``lower(ctx, layer, inputs, outputs)`` as the lowering of ``layer_type``.

    ``layer_type`` is the prototxt's ``type``. For ``"Python"`` layers, ``python_module`` and
    ``python_layer`` (the layer's ``python_param.module`` and ``.layer``) are required: each
    Python layer class is lowered on its own. ``check(layer, graph)`` returns None when the
    layer can be lowered, else the reason it cannot, as a string (the layer then runs in
    Caffe, and the partition report shows the reason). ``replace=True`` replaces an existing
    registration for the same target (a built-in one included); without it a clash raises
    ``LoweringClash``. A lowering or check that raises is reported and its layer runs in
    Caffe; raise ``ctx.error(layer.name, reason)`` to refuse a layer on purpose.

    Register before ``hybrid_infer.load`` partitions the model. Registrations are
    process-wide. Returns ``lower`` unchanged. Raises OptionError for arguments that cannot
    be right (used without parentheses, a check that is not callable, Python-layer fields
    on another type).
    """
    if not isinstance(layer_type, str):
        raise OptionError("register_lowering needs the layer type: write @register_lowering(\"MyType\"), "
                          "not a bare @register_lowering")
    if check is not None and not callable(check):
        raise OptionError(f"register_lowering({layer_type!r}): check must be a function "
                          f"(layer, graph) -> None or a reason string, not {check!r}")
    if layer_type == "Python":
        if not python_module or not python_layer:
            raise OptionError("register_lowering('Python', ...) needs python_module= and python_layer= "
                              "(the layer's python_param module and layer)")
    elif python_module or python_layer:
        raise OptionError(f"python_module/python_layer only apply to layer type 'Python', not '{layer_type}'")
    target = LoweringTarget(layer_type, python_module, python_layer)

    def decorate(lower: LowerFn) -> LowerFn:
        if not callable(lower):
            raise OptionError(f"register_lowering({layer_type!r}) decorates a function, not {lower!r}")
        origin = REGISTRY.current_origin(lower)
        if origin != BUILT_IN:
            _load_plugins()  # a user registration meets the built-in one it clashes with or replaces
        REGISTRY.add(Registration(target, lower, check, origin), replace=replace)
        return lower
    return decorate
