"""The plotting plumbing shared by report plots: off-screen axes, atomic PNG files."""
from __future__ import annotations

import io

from keras_qx._io import write_atomic

__all__ = ["axes", "finish"]


def axes(ax=None, figsize=(6, 4)):
    """``(fig, ax)``: the given axes (fig None), or a new off-screen figure."""
    if ax is not None:
        return None, ax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def finish(fig, path=None) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG (atomically) if given, and close it."""
    if fig is None:
        return
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if path is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        write_atomic(path, buf.getvalue())
    plt.close(fig)
