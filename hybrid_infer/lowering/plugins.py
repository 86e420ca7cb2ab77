"""Where lowerings come from: hybrid_infer's own modules, installed entry points, user modules.

Nothing is imported implicitly except hybrid_infer's built-in lowerings and the entry points
of installed packages (group ``hybrid_infer.lowerings``): a package that declares

    [project.entry-points."hybrid_infer.lowerings"]
    my_layers = "my_layers.lowerings"

has that module imported on first use, and its ``register_lowering`` calls take effect
without code changes. Other user modules are imported only when named
(``load(..., lowerings=[...])``, ``--lowerings MODULE``). Each registration records its origin,
which the partition report lists.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Sequence, Union

from ..errors import EnvironmentProblem, OptionError
from .registry import REGISTRY, Registration

ENTRY_POINT_GROUP = "hybrid_infer.lowerings"

#: hybrid_infer's own lowering modules, each registering its layers when imported.
_BUILTIN_MODULES = ("activations", "conv_pool", "normalization", "tensor_ops", "resampling", "reductions")

_loaded = False
_load_lock = threading.Lock()
#: What each user module registered when it was imported, so that naming it again restores
#: its registrations after ``REGISTRY.scope()`` undid them (Python imports a module once).
_registered_by: dict[str, list[Registration]] = {}

LoweringModule = Union[str, os.PathLike, ModuleType]


def load_builtins_and_entry_points() -> None:
    """Import the built-in lowerings and installed entry points, once per process.

    Raises EnvironmentProblem when an installed entry point fails to import (naming it and
    its package): a partition silently missing a lowering the user installed would mislead.
    """
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        for name in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{name}")
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            package = entry.dist.name if entry.dist is not None else "an unknown package"
            with REGISTRY.origin(f"entry point '{entry.name}' of package {package}"):
                try:
                    entry.load()
                except Exception as exc:
                    raise EnvironmentProblem(
                        f"the lowering entry point '{entry.name}' ({entry.value}) of the installed package "
                        f"{package} failed to import: {type(exc).__name__}: {exc}; fix or uninstall "
                        "that package") from exc
        _loaded = True


def load_lowering_modules(modules: Sequence[LoweringModule]) -> list[str]:
    """Import user lowering modules so that their ``register_lowering`` calls take effect.

    Each entry is an importable module name (``my_pkg.lowerings``), a path to a ``.py`` file,
    or an already imported module (its registrations happened at import). Returns the origin
    recorded for each. Raises OptionError for a module that cannot be found or fails to import.
    """
    load_builtins_and_entry_points()  # so that clashes with built-ins are seen now
    origins = []
    for module in modules:
        if isinstance(module, ModuleType):
            origins.append(f"module {module.__name__}")
            continue
        text = os.fspath(module)
        origin = f"--lowerings {text}"
        if text in _registered_by:
            for registration in _registered_by[text]:
                REGISTRY.add(registration)
        else:
            with REGISTRY.origin(origin) as made:
                if text.endswith(".py") or os.sep in text:
                    _import_file(Path(text))
                else:
                    _import_name(text)
            _registered_by[text] = made
        origins.append(origin)
    return origins


def _import_name(name: str) -> ModuleType:
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise OptionError(f"lowering module '{name}' cannot be found; put its folder on PYTHONPATH "
                          "or pass the path of its .py file")
    return _run_import(name, lambda: importlib.import_module(name))


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise OptionError(f"lowering module file '{path}' does not exist")
    name = f"hybrid_infer_user_lowerings.{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OptionError(f"'{path}' cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)

    def execute() -> ModuleType:
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except BaseException:
            del sys.modules[name]
            raise
        return module
    return _run_import(str(path), execute)


def _run_import(what: str, importer) -> ModuleType:
    try:
        return importer()
    except OptionError:
        raise  # a clash or a bad registration: already explained
    except Exception as exc:
        raise OptionError(f"lowering module '{what}' failed to import: {type(exc).__name__}: {exc}") from exc
