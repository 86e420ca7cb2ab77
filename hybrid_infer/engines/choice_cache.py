"""On-disk record of which CPU engine was fastest for a segment, so ``--engine auto`` measures once.

Entries live beside the TensorRT plans, under ``<engine cache>/choices/<key>.json``. The key
hashes everything that decides the outcome of the measurement: the segment's ONNX bytes,
its input shapes (batch included), each candidate engine with its version and precision,
the CPU model and the thread count. A record is written to a temporary name and moved into
place (``os.replace``), so readers see a whole record or none; one that does not parse or
does not match its key is ignored (the segment is measured again and the record rewritten).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Union

from ..errors import EnvironmentProblem, HybridInferError
from ..files import read_regular_file, write_files_atomically
from .engine_cache import default_directory

log = logging.getLogger("hybrid_infer")

CHOICE_FORMAT = 1
SUBDIRECTORY = "choices"


@dataclass(frozen=True)
class EngineChoice:
    """The engine measured fastest for one segment: ``median_ms`` per candidate (ms per run
    at ``batch``), when (local time, ISO 8601) and whether it came from the cache."""
    engine: str
    median_ms: Mapping[str, float]
    batch: int
    measured: str
    cached: bool = False


class ChoiceCache:
    """A directory of measured engine choices keyed by content; safe to share between processes.

    ``directory`` is the engine cache folder (``--engine-cache``, ``HYBRID_INFER_ENGINE_CACHE``,
    else ``~/.cache/hybrid_infer/engines``); records go to its ``choices`` subfolder.
    """

    def __init__(self, directory: Union[str, os.PathLike[str], None] = None) -> None:
        base = Path(directory).expanduser() if directory else default_directory()
        self.directory = base / SUBDIRECTORY

    @staticmethod
    def key(material: Mapping[str, Any]) -> str:
        """SHA-256 of ``material`` (JSON-serializable: ONNX digest, shapes, engines, CPU, threads)."""
        return hashlib.sha256(json.dumps({"format": CHOICE_FORMAT, **material}, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def lookup(self, key: str, candidates: Collection[str]) -> Optional[EngineChoice]:
        """The recorded choice for ``key`` among the engines named in ``candidates``, or None
        when there is none or it cannot be trusted (then it is measured again)."""
        path = self._path(key)
        if not os.path.lexists(path):
            return None
        try:  # a record is a few hundred bytes; anything else found there is not one
            record = json.loads(read_regular_file(path, "engine choice", EnvironmentProblem, max_bytes=2**16,
                                                  follow_symlinks=False))
        except (HybridInferError, ValueError) as exc:
            log.warning("engine choice %s is unusable (%s); measuring again", path, exc)
            return None
        try:
            if record["format"] != CHOICE_FORMAT or record["key"] != key or record["engine"] not in candidates:
                raise ValueError("does not match its key")
            median_ms = {str(name): float(ms) for name, ms in record["median_ms"].items()}
            return EngineChoice(str(record["engine"]), median_ms, int(record["batch"]), str(record["measured"]),
                                cached=True)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("engine choice %s is not a valid record (%s); measuring again", path, exc)
            return None

    def store(self, key: str, choice: EngineChoice) -> None:
        """Record ``choice`` atomically; a cache that cannot be written costs a re-measurement
        next time, so it is reported as a warning, not an error."""
        record = {"format": CHOICE_FORMAT, "key": key, "engine": choice.engine,
                  "median_ms": dict(choice.median_ms), "batch": choice.batch, "measured": choice.measured}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_files_atomically({self._path(key): json.dumps(record, indent=1).encode()},
                                   option="engine cache", error=EnvironmentProblem, owned_folder=True)
        except (OSError, HybridInferError) as exc:
            log.warning("cannot record the engine choice in %s (%s); it will be measured again next time",
                        self.directory, exc)


def now() -> str:
    """Local time for ``EngineChoice.measured``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
