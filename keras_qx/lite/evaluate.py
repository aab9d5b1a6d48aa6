"""``qx.evaluate_tflite``: a task metric, size (raw and gzip) and latency of a TFLite model.

Example:
    >>> qx.evaluate_tflite("model.tflite", x_test, y_test)     # doctest: +SKIP
    {'accuracy': 0.98, 'size_bytes': 83496, 'gzip_bytes': 61234, 'latency_ms': 0.04, ...}
    >>> qx.evaluate_tflite("reg.tflite", x, y, metric="mae")   # doctest: +SKIP
"""
from __future__ import annotations

import gzip
from typing import Callable, Union

import numpy as np

from keras_qx._deprecation import renamed_args
from keras_qx._io import check_inputs, check_labels
from keras_qx._runtime import run
from keras_qx.lite.inspect import inspect_tflite, read_model

__all__ = ["evaluate_tflite", "Evaluation", "gzip_size", "METRICS", "unit_threshold"]

Metric = Union[str, Callable]


def gzip_size(data: bytes) -> int:
    """Size after gzip -9: what the file costs to ship."""
    return len(gzip.compress(bytes(data), compresslevel=9, mtime=0))


def unit_threshold(pred) -> float:
    """The decision threshold of a single-unit output read from its values: 0.5 for a
    probability (every value inside [0, 1], as a sigmoid gives), 0.0 for a logit (any value
    outside [0, 1]). A logit output whose values all happen to fall inside [0, 1] reads as a
    probability: pass ``threshold=0.0`` (or ``from_logits=True``) to ``evaluate_tflite`` then."""
    pred = np.asarray(pred)
    return 0.5 if pred.size == 0 or (pred.min() >= 0.0 and pred.max() <= 1.0) else 0.0


def _accuracy(y, pred, threshold: float | None = None):
    """Top-1 accuracy: ``y`` as integer labels or one-hot; a single unit is a binary classifier
    with labels 0/1, thresholded at ``threshold`` (None: :func:`unit_threshold`, 0.5 for a
    probability, 0 for a logit)."""
    if pred.ndim == 2 and pred.shape[1] > 1:  # the usual classifier: ids or one-hot, checked
        return float((pred.argmax(1) == check_labels(y, len(pred), "y", classes=pred.shape[1])).mean())
    if pred.shape[-1] == 1:
        if y.size != pred.size:
            raise ValueError(f"labels of shape {y.shape} do not fit the single-unit output {pred.shape}.")
        cut = unit_threshold(pred) if threshold is None else float(threshold)
        return float(((pred.reshape(y.shape) > cut) == (y > 0.5)).mean())
    if y.shape == pred.shape:
        y = y.argmax(-1)
    if y.shape != pred.shape[:-1]:
        raise ValueError(f"labels of shape {y.shape} do not fit outputs of shape {pred.shape}: pass integer "
                         f"labels shaped {pred.shape[:-1]} or one-hot labels shaped {pred.shape}.")
    return float((pred.argmax(-1) == y).mean())


def _regression(fn):
    def metric(y, pred):
        if y.size != pred.size:
            raise ValueError(f"targets of shape {y.shape} do not fit outputs of shape {pred.shape}.")
        return float(fn(pred.reshape(y.shape).astype(np.float64) - y))
    return metric


METRICS = {
    "accuracy": _accuracy,
    "mae": _regression(lambda d: np.abs(d).mean()),
    "mse": _regression(lambda d: (d ** 2).mean()),
    "rmse": _regression(lambda d: np.sqrt((d ** 2).mean())),
}


def _metric_fn(metric: Metric, threshold: float | None = None) -> tuple[str, Callable]:
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {sorted(METRICS)} or a function "
                         "metric(y_true, y_pred) -> float.")
    if metric == "accuracy":
        return metric, lambda y, pred: _accuracy(y, pred, threshold)
    return metric, METRICS[metric]


def _single_unit_threshold(threshold, from_logits) -> float | None:
    """The threshold ``evaluate_tflite`` scores a single unit at: ``threshold`` if given, 0 for
    ``from_logits=True``, 0.5 for ``False``, None (read from the outputs) for None."""
    if from_logits is not None and not isinstance(from_logits, bool):
        raise TypeError(f"evaluate_tflite(from_logits=...) must be True, False or None (read from the outputs), "
                        f"got {from_logits!r}.")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not np.isfinite(threshold):
            raise ValueError(f"evaluate_tflite(threshold=...) is the decision value of a single-unit output (0.5 for "
                             f"a probability, 0.0 for a logit), got {threshold!r}.")
        if from_logits is not None and float(threshold) != (0.0 if from_logits else 0.5):
            raise ValueError(f"evaluate_tflite got threshold={threshold!r} and from_logits={from_logits!r}, which "
                             "disagree; pass one of them.")
        return float(threshold)
    return None if from_logits is None else (0.0 if from_logits else 0.5)


def _per_output(value, n: int, what: str) -> list:
    """``value`` once per output: a list/tuple of ``n`` items, or one item for all."""
    if isinstance(value, (list, tuple)) and n > 1:
        if len(value) != n:
            raise ValueError(f"the model has {n} outputs but {what} holds {len(value)} entries; pass one per output.")
        return list(value)
    return [value] * n if what == "metric" else [value]


class Evaluation(dict):
    """What :func:`evaluate_tflite` measured: a dict (``result["accuracy"]``) with the three doors
    every keras_qx result has: ``.table()``, ``.to_dict()``, ``.plot()`` (none: one row of numbers)."""

    def to_dict(self) -> dict:
        return dict(self)

    def table(self) -> str:
        """A two-column Markdown table of the measurements."""
        def shown(v):
            return f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v)
        return "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {shown(v)} |" for k, v in self.items()])


@renamed_args(model_bytes_or_path="tflite")
def evaluate_tflite(tflite, x, y=None, *, metric: Metric | list = "accuracy",
                    latency_runs: int = 200, num_threads: int = 1, from_logits: bool | None = None,
                    threshold: float | None = None) -> Evaluation:
    """Evaluate a TFLite model in the runtime (run in a child process: an abort cannot end yours).

    Example:
        >>> result = qx.evaluate_tflite("model.tflite", x_test, y_test)   # doctest: +SKIP
        >>> print(result.table())                                           # doctest: +SKIP

    Args:
        tflite: the file: a path, its bytes, or what ``qx.export_tflite`` returned.
        x: samples (n, *input_shape); for several inputs a dict keyed by input name.
        y: targets: integer labels (n,) or one-hot for ``"accuracy"``, values for a regression
            metric; a list with one entry per output for a multi-output model; None to measure
            only size and latency.
        metric: ``"accuracy"``, ``"mae"``, ``"mse"``, ``"rmse"`` or a function
            ``metric(y_true, y_pred) -> float``; a list for one metric per output.
        latency_runs: single-sample invocations timed for the median latency (after warm-up).
        from_logits, threshold: how ``"accuracy"`` decides a single-unit (binary) output: at
            ``threshold`` if given; ``from_logits=True`` means 0 (a logit), ``False`` 0.5 (a
            probability); both None read it from the outputs: 0.5 when every value is inside
            [0, 1] (a sigmoid), else 0 (a logit). Labels are 0/1 either way.

    Returns:
        :class:`Evaluation`, a dict ``{<metric>: value, "size_bytes", "gzip_bytes", "latency_ms", "latency_p90_ms", "n",
        "delegate", "threads"}``; a multi-output model's metrics are keyed ``"<metric>/output_<i>"``.
    """
    cut = _single_unit_threshold(threshold, from_logits)
    info = inspect_tflite(tflite)  # errors name the file
    model = read_model(tflite)
    specs = [(name, shape, "int32" if kind in ("INT32", "INT64") else "float32")  # token ids stay integers
             for name, kind, shape in info.inputs]
    names = [name for name, _, _ in specs]
    if len(specs) > 1 and not isinstance(x, dict):
        raise ValueError(f"the file has {len(specs)} inputs {sorted(names)}: pass x as a dict keyed by input name "
                         "(a TFLite file does not keep the model's input order, so a list would be ambiguous).")
    xs = check_inputs(x, specs, "x")
    if y is not None and metric == "accuracy" and not isinstance(y, (list, tuple)):
        check_labels(y, len(xs[0]), "y")  # type, length and NaN before the run; the classes after it
    result = run(model, dict(zip(names, xs)) if len(xs) > 1 else xs[0], num_threads=num_threads,
                 latency_runs=latency_runs)
    n_out = len(result.outputs)
    scores = {}
    if y is not None:
        targets = y if n_out == 1 else _per_output(y, n_out, "y")
        targets = [targets] if n_out == 1 else targets
        metrics = [_metric_fn(m, cut) for m in _per_output(metric, n_out, "metric")]
        for i, (target, (name, fn), pred) in enumerate(zip(targets, metrics, result.outputs)):
            target = np.asarray(target)
            if len(target) != len(xs[0]):
                raise ValueError(f"x has {len(xs[0])} samples but y{'' if n_out == 1 else f'[{i}]'} has "
                                 f"{len(target)}; they must match.")
            scores[name if n_out == 1 else f"{name}/output_{i}"] = fn(target, pred)
    times = result.times or [float("nan")]
    return Evaluation({
        **scores,
        "size_bytes": len(model),
        "gzip_bytes": gzip_size(model),
        "latency_ms": float(np.median(times) * 1e3),
        "latency_p90_ms": float(np.percentile(times, 90) * 1e3),
        "n": int(len(xs[0])),
        "delegate": result.delegate,  # "xnnpack", or "builtin" where XNNPACK declined the graph
        "threads": int(num_threads),
    })
