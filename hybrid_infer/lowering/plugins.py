"""Where lowerings come from: hybrid_infer's own modules, installed entry points, user modules.

Nothing is imported implicitly except hybrid_infer's built-in lowerings and the entry points
of installed packages (group ``hybrid_infer.lowerings``): a package that declares

    [project.entry-points."hybrid_infer.lowerings"]
    my_layers = "my_layers.lowerings"

has that module imported on first use, and its ``register_lowering`` calls take effect
without code changes (set HYBRID_INFER_NO_ENTRY_POINTS=1 to skip them all). Other user
modules are imported only when named (``load(..., lowerings=[...])``, ``--lowerings MODULE``).
Each registration records its origin, which the partition report lists.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Sequence, Union

from ..errors import EnvironmentProblem, OptionError
from .registry import REGISTRY, USER_FILE_MODULES

ENTRY_POINT_GROUP = "hybrid_infer.lowerings"
#: Set to 1 to leave installed entry points alone (a broken plugin package, a clean run).
NO_ENTRY_POINTS = "HYBRID_INFER_NO_ENTRY_POINTS"

#: hybrid_infer's own lowering modules, each registering its layers when imported.
_BUILTIN_MODULES = ("activations", "conv_pool", "normalization", "tensor_ops", "resampling", "reductions")

log = logging.getLogger("hybrid_infer")
_loaded = False
_loading = False
_load_lock = threading.RLock()

LoweringModule = Union[str, os.PathLike, ModuleType]


def load_builtins_and_entry_points() -> None:
    """Import the built-in lowerings, then installed entry points, once per process.

    Re-entrant: registrations made while these modules import call back here and return.
    Raises EnvironmentProblem when an installed entry point fails to import (naming it, its
    package, and the variable that skips entry points): a partition silently missing a
    lowering the user installed would mislead.
    """
    global _loaded, _loading
    if _loaded or _loading:
        return
    with _load_lock:
        if _loaded or _loading:
            return
        _loading = True
        try:
            for name in _BUILTIN_MODULES:
                importlib.import_module(f"{__package__}.{name}")
            if os.environ.get(NO_ENTRY_POINTS, "") not in ("", "0"):
                entries = []
            else:
                entries = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
            for entry in entries:
                package = entry.dist.name if entry.dist is not None else "an unknown package"
                with REGISTRY.origin(f"entry point '{entry.name}' of package {package}"):
                    try:
                        entry.load()
                    except OptionError:
                        raise
                    except Exception as exc:
                        raise EnvironmentProblem(
                            f"the lowering entry point '{entry.name}' ({entry.value}) of the installed package "
                            f"{package} failed to import: {type(exc).__name__}: {exc}; fix or uninstall that "
                            f"package, or set {NO_ENTRY_POINTS}=1 to skip installed lowerings") from exc
            _loaded = True
        finally:
            _loading = False


def load_lowering_modules(modules: Union[LoweringModule, Sequence[LoweringModule]], *,
                          label: str = "lowerings=") -> list[str]:
    """Import user lowering modules so that their ``register_lowering`` calls take effect.

    Each entry is an importable module name (``my_pkg.lowerings``), a path to a ``.py`` file,
    or an already imported module; a single one may be given alone. A module named again
    (after ``REGISTRY.scope()`` undid its registrations) gets them back. ``label`` says how
    the modules were named, for the origins the report shows (the CLI passes "--lowerings").
    Returns the origins. Raises OptionError for a module that cannot be found or fails to
    import, or whose registrations clash; warns about a module that registers nothing and
    about lowerings for layer types this Caffe does not have.
    """
    if isinstance(modules, (str, os.PathLike, ModuleType)):
        modules = [modules]
    load_builtins_and_entry_points()  # so that clashes with built-ins are seen now
    origins = []
    for module in modules:
        if isinstance(module, ModuleType):
            name, origin = module.__name__, f"{label}module {module.__name__}"
        else:
            text = os.fspath(module)
            origin = f"{label}{text}" if label.endswith("=") else f"{label} {text}"
            with REGISTRY.origin(origin):
                name = _import(text).__name__
        if REGISTRY.restore_module(name, origin) == 0:
            log.warning("lowering module %s registered no lowering (is register_lowering called when it "
                        "is imported?)", name)
        _warn_unknown_types(name)
        origins.append(origin)
    return origins


def _import(text: str) -> ModuleType:
    path = Path(text)
    if text.endswith(".py") or os.sep in text:
        if path.is_dir():
            raise OptionError(f"lowering module '{text}' is a folder; pass a .py file, or put the folder on "
                              "PYTHONPATH and pass the module's name")
        return _import_file(path)
    return _import_name(text)


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
    # One module per file, however many files share a name in different folders.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"{USER_FILE_MODULES}{path.stem}_{digest}"
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


def _warn_unknown_types(module: str) -> None:
    """A lowering for a type this Caffe lacks can never apply: most often a misspelt type."""
    from ..model.caffe_import import registered_layer_types
    known = registered_layer_types()
    for registration in REGISTRY.registrations():
        layer_type = registration.target.layer_type
        if registration.lower.__module__ != module or layer_type in known:
            continue
        close = difflib.get_close_matches(layer_type, known, n=1, cutoff=0.6) or \
            [t for t in known if t.lower() == layer_type.lower()]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        log.warning("%s lowers layer type '%s', which this Caffe does not have%s", registration.describe(),
                    layer_type, hint)
