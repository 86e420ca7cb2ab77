"""How each tensor went from one engine to the next in a run, and what that copied.

On a GPU the hand-offs, not the engines, are often what a partition costs: a boundary
that crosses the PCIe bus twice can take longer than the segment it feeds. This table
shows per hand-off whether the tensor stayed on the device or was copied, and its bytes.
"""
from __future__ import annotations

from typing import Sequence

from ..executor.hybrid_executor import DEVICE_POINTER, Handoff
from .partition_report import _human_bytes, _table


def to_text(handoffs: Sequence[Handoff]) -> str:
    """A table of the hand-offs and a totals line (empty string when there are none)."""
    if not handoffs:
        return ""
    rows = [[h.value, f"{h.source} -> {h.target}", h.path, _human_bytes(h.nbytes), _human_bytes(h.copied_bytes)]
            for h in handoffs]
    by_pointer = sum(h.path == DEVICE_POINTER for h in handoffs)
    copied = sum(h.copied_bytes for h in handoffs)
    lines = _table(["value", "from -> to", "path", "bytes", "copied"], rows)
    lines.append(f"{len(handoffs)} hand-off(s): {by_pointer} by device pointer, "
                 f"{_human_bytes(copied)} copied between host and device")
    return "\n".join(lines) + "\n"
