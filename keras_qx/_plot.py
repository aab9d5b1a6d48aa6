"""The plotting plumbing shared by report plots: off-screen axes, atomic PNG files.

Figures are drawn on their own Agg canvas, without pyplot: a report plot never switches the
process's matplotlib backend nor registers a figure with pyplot.
"""
from __future__ import annotations

import io

from keras_qx._io import write_atomic

__all__ = ["axes", "finish"]


def axes(ax=None, figsize=(6, 4)):
    """``(fig, ax)``: the given axes (fig None), or a new off-screen figure."""
    if ax is not None:
        return None, ax
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def finish(fig, path=None) -> None:
    """Lay out ``fig`` and write it to ``path`` as PNG (atomically) if given."""
    if fig is None:
        return
    fig.tight_layout()
    if path is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        write_atomic(path, buf.getvalue())
