"""Partition specs: how ``compare`` is told which partitions to measure.

A spec is either ``caffe`` (the whole model in pure Caffe, the reference) or comma-separated
``key=value`` settings of a hybrid partition, e.g. ``profile=tensorrt-2,min=1,fallback=LRN+Concat``:

- ``profile``: ``tensorrt`` (default) or ``tensorrt-2``
- ``min``: the minimum TensorRT segment size in compute layers (default 3)
- ``fallback``: layer names or types forced to Caffe, joined by ``+``
- ``engine``: what runs the supported segments (``auto``, ``onnxruntime``, ``openvino``,
  ``tensorrt``, ``caffe``); without it, ``compare``'s ``--engine``

A spec's ``label`` is its canonical spelling, so any label printed by ``compare`` can be
passed back as ``--partition``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

from ..errors import OptionError
from ..executor.engine_factory import ENGINES
from ..partition.capability import PROFILES

CAFFE_SPEC = "caffe"
DEFAULT_PROFILE = "tensorrt"
DEFAULT_MIN_SEGMENT_SIZE = 3
_KEYS = ("profile", "min", "fallback", "engine")


@dataclass(frozen=True)
class PartitionSpec:
    """One partition to measure; ``pure_caffe`` ignores the other fields. ``engine`` None:
    the engine ``compare`` was given."""
    pure_caffe: bool = False
    profile: str = DEFAULT_PROFILE
    min_segment_size: int = DEFAULT_MIN_SEGMENT_SIZE
    fallback: tuple[str, ...] = ()
    engine: Optional[str] = None

    @property
    def label(self) -> str:
        if self.pure_caffe:
            return CAFFE_SPEC
        text = f"profile={self.profile},min={self.min_segment_size}"
        text += f",fallback={'+'.join(self.fallback)}" if self.fallback else ""
        return text + (f",engine={self.engine}" if self.engine else "")


PURE_CAFFE = PartitionSpec(pure_caffe=True)


def parse_spec(text: str) -> PartitionSpec:
    """Parse one ``--partition`` value; every mistake names the spec and the valid spelling."""
    spec = text.strip()
    if spec == CAFFE_SPEC:
        return PURE_CAFFE
    usage = (f"--partition {text!r}: expected 'caffe' or key=value pairs joined by commas with keys "
             f"{', '.join(_KEYS)}, e.g. profile=tensorrt-2,min=1,fallback=LRN+Concat")
    if not spec:
        raise OptionError(usage)
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _KEYS or not value:
            raise OptionError(f"{usage} (cannot read {part.strip()!r})")
        if key in fields:
            raise OptionError(f"--partition {text!r}: '{key}' is given twice")
        fields[key] = value
    profile = fields.get("profile", DEFAULT_PROFILE)
    if profile not in PROFILES:
        raise OptionError(f"--partition {text!r}: unknown profile '{profile}'; choose one of "
                          f"{', '.join(PROFILES)}")
    try:
        min_size = int(fields.get("min", DEFAULT_MIN_SEGMENT_SIZE))
    except ValueError:
        raise OptionError(f"--partition {text!r}: min must be a whole number of layers, "
                          f"not {fields['min']!r}") from None
    if min_size < 0:
        raise OptionError(f"--partition {text!r}: min must be 0 or more")
    fallback = tuple(name.strip() for name in fields["fallback"].split("+")) if "fallback" in fields else ()
    if not all(fallback):
        raise OptionError(f"--partition {text!r}: fallback needs layer names or types joined by '+', with no "
                          "empty name, e.g. fallback=LRN+Concat")
    engine = fields.get("engine")
    if engine is not None and engine not in ENGINES:
        raise OptionError(f"--partition {text!r}: unknown engine '{engine}'; choose one of {', '.join(ENGINES)}")
    return PartitionSpec(False, profile, min_size, fallback, engine)


def default_specs(fallback_lists: Iterable[Sequence[str]] = ()) -> list[PartitionSpec]:
    """Pure Caffe, both profiles, minimum sizes 1, 3 and 10, then one per user fallback list."""
    specs = [PURE_CAFFE, PartitionSpec(), PartitionSpec(profile="tensorrt-2"),
             PartitionSpec(min_segment_size=1), PartitionSpec(min_segment_size=10)]
    specs += [PartitionSpec(fallback=tuple(names)) for names in fallback_lists]
    return specs


def unique_with_caffe_first(specs: Iterable[PartitionSpec]) -> list[PartitionSpec]:
    """Drop repeated specs; pure Caffe always comes first, since accuracy is measured against it."""
    ordered = [PURE_CAFFE]
    for spec in specs:
        if spec not in ordered:
            ordered.append(spec)
    return ordered


def with_engines(specs: Iterable[PartitionSpec], engines: Sequence[str]) -> list[PartitionSpec]:
    """Each hybrid spec without an engine once per engine in ``engines`` (side by side);
    pure Caffe and specs naming their engine stay as they are."""
    expanded: list[PartitionSpec] = []
    for spec in specs:
        if spec.pure_caffe or spec.engine:
            expanded.append(spec)
        else:
            expanded += [replace(spec, engine=engine) for engine in engines]
    return expanded
