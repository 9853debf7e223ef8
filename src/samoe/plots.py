"""matplotlib for the modules that draw PNGs (analysis/, study/), loaded on first use: pyplot
takes most of a second to import, which `samoe --help` and the verbs that draw nothing skip."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display)."""
    import matplotlib  # lazy, as the module docstring says; Agg must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Write a figure atomically (temp name + rename)."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=fig.dpi)
    tmp.replace(path)
