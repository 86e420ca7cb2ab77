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

from ..errors import OptionError

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
        """Why this lowering cannot take ``layer`` (its check's answer), or None."""
        return self.check(layer, graph) if self.check is not None else None

    def describe(self) -> str:
        return f"{self.lower.__module__}.{self.lower.__qualname__} ({self.origin})"


class LoweringClash(OptionError):
    """Two lowerings were registered for the same layer without ``replace=True``."""


class LoweringRegistry:
    """The registrations in force, by target. Thread-safe; lookups load the built-in lowerings
    and the installed entry points on first use (see ``lowering.plugins``)."""

    def __init__(self) -> None:
        self._by_target: dict[LoweringTarget, Registration] = {}
        self._lock = threading.RLock()
        self._origin_stack: list[tuple[str, list[Registration]]] = []

    def add(self, registration: Registration, *, replace: bool = False) -> None:
        """Register; raises LoweringClash when the target is taken and ``replace`` is False.

        Registering the same function again (a module imported twice) changes nothing.
        """
        with self._lock:
            old = self._by_target.get(registration.target)
            if old is not None and not replace:
                same = (old.lower.__module__, old.lower.__qualname__) == \
                       (registration.lower.__module__, registration.lower.__qualname__)
                if same:
                    return
                raise LoweringClash(
                    f"two lowerings for {registration.target}: {old.describe()} and "
                    f"{registration.describe()}; pass replace=True to register_lowering to replace "
                    "the first one deliberately")
            self._by_target[registration.target] = registration
            if self._origin_stack:
                self._origin_stack[-1][1].append(registration)

    def find(self, layer: "Layer") -> Optional[Registration]:
        """The registration that lowers ``layer``, or None."""
        from .plugins import load_builtins_and_entry_points
        load_builtins_and_entry_points()
        return self._by_target.get(LoweringTarget.of(layer))

    def registrations(self) -> list[Registration]:
        """Every registration in force, built-in ones first, then in target order."""
        from .plugins import load_builtins_and_entry_points
        load_builtins_and_entry_points()
        with self._lock:
            return sorted(self._by_target.values(), key=lambda r: (not r.built_in, str(r.target)))

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Undo, on leaving the block, every registration made or replaced inside it (to try a
        lowering in a notebook or a test without changing the process for good)."""
        from .plugins import load_builtins_and_entry_points
        load_builtins_and_entry_points()
        with self._lock:
            saved = dict(self._by_target)
        try:
            yield
        finally:
            with self._lock:
                self._by_target = saved

    @contextlib.contextmanager
    def origin(self, origin: str) -> Iterator[list[Registration]]:
        """Attribute registrations made inside the block (by importing a module) to ``origin``;
        yields the list they are collected in."""
        made: list[Registration] = []
        with self._lock:
            self._origin_stack.append((origin, made))
        try:
            yield made
        finally:
            with self._lock:
                self._origin_stack.pop()

    def current_origin(self, lower: LowerFn) -> str:
        """Where a registration made now comes from."""
        if self._origin_stack:
            return self._origin_stack[-1][0]
        if lower.__module__.startswith("hybrid_infer.lowering."):
            return BUILT_IN
        return f"registered by module {lower.__module__}"


REGISTRY = LoweringRegistry()


def register_lowering(layer_type: str, *, python_module: Optional[str] = None,
                      python_layer: Optional[str] = None, check: Optional[Check] = None,
                      replace: bool = False) -> Callable[[LowerFn], LowerFn]:
    """Decorator: register ``lower(ctx, layer, inputs, outputs)`` as the lowering of ``layer_type``.

    ``layer_type`` is the prototxt's ``type``. For ``"Python"`` layers, ``python_module`` and
    ``python_layer`` (the layer's ``python_param.module`` and ``.layer``) are required: each
    Python layer class is lowered on its own. ``check(layer, graph)`` returns None when the
    layer can be lowered, else the reason it cannot (the layer then runs in Caffe, and the
    partition report shows the reason). ``replace=True`` replaces an existing registration for
    the same target (a built-in one included); without it a clash raises ``LoweringClash``.

    Register before ``hybrid_infer.load`` partitions the model. Registrations are
    process-wide. Returns ``lower`` unchanged.
    """
    if layer_type == "Python":
        if not python_module or not python_layer:
            raise OptionError("register_lowering('Python', ...) needs python_module= and python_layer= "
                              "(the layer's python_param module and layer)")
    elif python_module or python_layer:
        raise OptionError(f"python_module/python_layer only apply to layer type 'Python', not '{layer_type}'")
    target = LoweringTarget(layer_type, python_module, python_layer)

    def decorate(lower: LowerFn) -> LowerFn:
        REGISTRY.add(Registration(target, lower, check, REGISTRY.current_origin(lower)), replace=replace)
        return lower
    return decorate
