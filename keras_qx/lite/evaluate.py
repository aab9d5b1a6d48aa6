"""``qx.evaluate_tflite``: accuracy, size (raw and gzip) and latency of a TFLite model.

Example:
    >>> qx.evaluate_tflite("model.tflite", x_test, y_test)     # doctest: +SKIP
    {'accuracy': 0.98, 'size_bytes': 83496, 'gzip_bytes': 61234, 'latency_ms': 0.04, ...}
"""
from __future__ import annotations

import gzip

import numpy as np

from keras_qx._io import check_labels, check_samples
from keras_qx._runtime import run
from keras_qx.lite.inspect import inspect_tflite, read_model

__all__ = ["evaluate_tflite", "gzip_size"]


def gzip_size(data: bytes) -> int:
    """Size after gzip -9: what the file costs to ship."""
    return len(gzip.compress(bytes(data), compresslevel=9, mtime=0))


def evaluate_tflite(model_bytes_or_path, x, y, *, latency_runs: int = 200, num_threads: int = 1) -> dict:
    """Evaluate a single-input classifier in the TFLite runtime.

    Args:
        x: float samples (n, *input_shape); y: integer labels (n,) or one-hot (n, classes).
        latency_runs: single-sample invocations timed for the median latency (after warm-up).

    Returns:
        ``{"accuracy", "size_bytes", "gzip_bytes", "latency_ms", "latency_p90_ms", "n", "delegate"}``.
    """
    info = inspect_tflite(model_bytes_or_path)  # errors name the file
    model = read_model(model_bytes_or_path)
    if len(info.inputs) != 1:
        raise ValueError(f"evaluate_tflite handles single-input models; this one has {len(info.inputs)} inputs.")
    _, input_type, input_shape = info.inputs[0]
    dtype = "int32" if input_type in ("INT32", "INT64") else "float32"  # token ids stay integers
    x = check_samples(x, input_shape, "x", dtype=dtype)
    check_labels(y, len(x), "y")  # type, length and NaN before the run; the classes after it
    result = run(model, x, num_threads=num_threads, latency_runs=latency_runs)  # in a child process
    outputs = result.outputs.reshape(len(x), -1)
    y = check_labels(y, len(x), "y", classes=outputs.shape[1])
    pred = outputs.argmax(1)
    times = result.times or [float("nan")]
    return {
        "accuracy": float((pred == y).mean()),
        "size_bytes": len(model),
        "gzip_bytes": gzip_size(model),
        "latency_ms": float(np.median(times) * 1e3),
        "latency_p90_ms": float(np.percentile(times, 90) * 1e3),
        "n": int(len(x)),
        "delegate": result.delegate,  # "xnnpack", or "builtin" where XNNPACK declined the graph
    }
