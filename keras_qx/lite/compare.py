"""``qx.compare``: several roads to a small model judged side by side in the TFLite runtime.

One row per file: the task metric, bytes, gzip'd bytes, the size ratio to a reference file,
the kernel sparsity and INT4 / INT2 tensor counts measured in the file, and the median latency over
repeated single-sample runs (thread count stated). Each file runs in a child process.

Example:
    >>> cmp = qx.compare({"float32": f32, "int8": q8, "mixed": mixed}, x_test, y_test)   # doctest: +SKIP
    >>> print(cmp.table()); cmp.plot("roads.png")                                       # doctest: +SKIP
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from keras_qx._plot import axes, finish
from keras_qx.lite.evaluate import evaluate_tflite
from keras_qx.lite.inspect import inspect_tflite, read_model

__all__ = ["compare", "Comparison"]


@dataclass
class Comparison:
    """The rows of :func:`compare` (dicts, in the order given) and the metric they score."""

    rows: list
    metric: str
    reference: str

    def to_dict(self) -> dict:
        return {"metric": self.metric, "reference": self.reference, "rows": [dict(r) for r in self.rows]}

    def table(self) -> str:
        """A Markdown table of the rows."""
        head = (f"| road | {self.metric} | bytes | gzip bytes | gzip vs {self.reference} | kernel sparsity "
                "| INT4 / INT2 tensors | latency ms (median) |")
        lines = [head, "|" + "---|" * 8]
        for r in self.rows:
            score = r.get(self.metric)
            shown = "-" if score is None else f"{score:.2%}" if self.metric == "accuracy" else f"{score:.4g}"
            lines.append(f"| {r['road']} | {shown} | {r['size_bytes']:,} | {r['gzip_bytes']:,} | "
                         f"{r['gzip_ratio']:.1f}x | {r['kernel_sparsity']:.1%} | {r['int4_tensors']} / {r['int2_tensors']} | "
                         f"{r['latency_ms']:.3f} |")
        lines.append(f"\nLatency: median of single-sample runs, {self.rows[0]['threads']} thread(s), delegate "
                     + ", ".join(sorted({r['delegate'] for r in self.rows})) + ".")
        return "\n".join(lines)

    def plot(self, path=None, ax=None):
        """Size (gzip'd bytes, log scale) against the metric, one labelled point per road."""
        fig, ax = axes(ax)
        for r in self.rows:
            if r.get(self.metric) is None:
                continue
            ax.scatter(r["gzip_bytes"], r[self.metric])
            ax.annotate(r["road"], (r["gzip_bytes"], r[self.metric]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("gzip'd file bytes")
        ax.set_ylabel(self.metric)
        ax.set_title("size vs " + self.metric)
        ax.grid(True, alpha=0.3)
        finish(fig, path)
        return ax


def compare(roads: dict, x, y=None, *, metric="accuracy", reference: str | None = None,
            latency_runs: int = 200, num_threads: int = 1) -> Comparison:
    """Evaluate each TFLite file of ``roads`` (``{name: bytes or path}``) on ``x``, ``y``.

    Args:
        roads: names to TFLite files (bytes, e.g. from ``export_tflite``/``ptq``, or paths).
        x, y, metric: as in :func:`~keras_qx.lite.evaluate.evaluate_tflite` (``metric`` also
            ``"mae"``, ``"mse"``, ``"rmse"`` or a function; one metric for single-output models).
        reference: the road sizes are compared with (default: the largest file).
        latency_runs: timed single-sample invocations per file.

    Returns:
        :class:`Comparison` with ``.rows``, ``.table()`` and ``.plot(path)``.
    """
    if not isinstance(roads, dict) or not roads:
        raise TypeError("roads must be a non-empty dict {name: TFLite bytes or path}, e.g. "
                        "{'float32': 'float.tflite', 'int8': tfl}.")
    if reference is not None and reference not in roads:
        raise ValueError(f"reference {reference!r} is not one of the roads {list(roads)}.")
    files = {}
    for name, model in roads.items():
        try:
            files[name] = read_model(model)
        except (ValueError, TypeError, OSError) as err:
            raise type(err)(f"road {name!r}: {err}") from err
    rows = []
    for name, data in files.items():
        info = inspect_tflite(data)
        result = evaluate_tflite(data, x, y, metric=metric, latency_runs=latency_runs, num_threads=num_threads)
        rows.append({"road": name, **result, "kernel_sparsity": info.kernel_sparsity,
                     "int4_tensors": len(info.int4_tensors), "int2_tensors": len(info.int2_tensors), "fully_integer": info.fully_integer,
                     "path": os.fspath(roads[name]) if isinstance(roads[name], (str, os.PathLike)) else None})
    reference = reference or max(rows, key=lambda r: r["size_bytes"])["road"]
    ref = next(r for r in rows if r["road"] == reference)
    for r in rows:
        r["size_ratio"] = ref["size_bytes"] / r["size_bytes"]
        r["gzip_ratio"] = ref["gzip_bytes"] / r["gzip_bytes"]
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    return Comparison(rows, name, reference)
