"""Bar charts of latencies for ``compare`` and ``scripts/bench.py`` (matplotlib, no display).

matplotlib is an optional dependency (the ``bench`` extra): it is imported only when a
chart is asked for, and its absence is reported as something the user can install.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..errors import EnvironmentProblem, OptionError
from ..files import check_output_path, write_atomically

CHART_SUFFIXES = (".png", ".svg", ".pdf")


def check_writable(path: Path, option: str, suffixes: Sequence[str] = ()) -> None:
    """Fail before any measuring if ``path`` cannot be written, rather than after minutes of it."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise OptionError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    check_output_path(path, option)


def grouped_bar_chart(path: Path, groups: Sequence[str], series: Mapping[str, Sequence[Optional[float]]], *,
                      title: str, ylabel: str,
                      errors: Optional[Mapping[str, Sequence[Optional[float]]]] = None,
                      colours: Optional[Mapping[str, str]] = None, note: str = "") -> None:
    """One cluster of bars per group, one bar per series; ``None`` values are drawn as "n/a".

    ``errors`` gives an upper whisker per bar (e.g. p90 minus median); ``note`` is printed
    under the axes (the machine, what n/a means).
    """
    # matplotlib warns through logging when the home folder cannot hold its cache (it then
    # uses a temporary folder, removed at exit): a chart is still drawn, so no warning.
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EnvironmentProblem("charts need matplotlib: pip install 'hybrid_infer[bench]' "
                                 "(or pip install matplotlib)") from None
    names = list(series)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.3 * len(groups) * len(names) + 2)), 5.0))
    top = max([v for values in series.values() for v in values if v is not None] or [1.0])
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        values = series[name]
        present = [(x, v) for x, v in zip(xs, values) if v is not None]
        whiskers = None
        if errors and name in errors:
            whiskers = [[0] * len(present), [e or 0 for (x, v), e in zip(zip(xs, values), errors[name])
                                             if v is not None]]
        ax.bar([x for x, _ in present], [v for _, v in present], width, label=name,
               color=(colours or {}).get(name), yerr=whiskers, capsize=2 if whiskers else 0)
        for x, v in zip(xs, values):
            if v is None:
                ax.text(x, top * 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7)
    longest = max((len(line) for g in groups for line in g.split("\n")), default=0)
    tilt = longest * len(groups) > 90
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=35 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(names) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    # Rendered in memory and written like every output file: never into a FIFO or device.
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    write_atomically(path, image.getvalue(), option="chart")
