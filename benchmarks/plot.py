"""The benchmarks' figures, drawn with matplotlib (the optional extra ``flashdsa[plot]``).

matplotlib is imported only when a figure is drawn: the benchmark scripts import and run
without it, and say how to draw their figures later (``--plot-from``) when it is missing.
"""
from __future__ import annotations

import os

INSTALL_HINT = "plots need matplotlib: pip install 'flashdsa[plot]' (or pip install matplotlib)"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, with SVG output that is the same bytes
    for the same data (fixed element ids, no date); ModuleNotFoundError naming the extra to
    install when matplotlib is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(INSTALL_HINT, name="matplotlib") from e
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "flashdsa"
    matplotlib.rcParams["svg.fonttype"] = "none"   # text as text: small files, searchable labels
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str) -> str:
    """Write ``fig`` to ``path`` (format from the suffix, no creation date; the folder is
    created) and close it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, metadata={"Date": None} if path.endswith(".svg") else None, bbox_inches="tight")
    pyplot().close(fig)
    return path


def line_chart(series: dict[str, list[tuple[float, float]]], path: str, title: str, xlabel: str, ylabel: str,
               logx: bool = False) -> str:
    """One line per series (name -> [(x, y), ...]), legend outside on the right; returns path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in series.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, label=name, linewidth=1.5)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return save(fig, path)
