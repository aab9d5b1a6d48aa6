"""``qx.calibrate``: activation ranges of a QAT model from data, without training.

A freshly quantized model has tfmot's initial activation ranges ([-6, 6], [0, 0] at the
input), and training moves them only by a moving average (0.1% a step), so a model quantized
and exported at once, or after a few steps, gives a useless file. ``calibrate`` runs the data
through the model with every activation quantizer observing instead of quantizing (weights
stay quantized) and sets each range to the observed min/max, as the post-training converter
does; training can go on from there. ``weights="gptq"`` also rounds the kernels GPTQ-style
(:mod:`keras_qx.qat.gptq`) instead of to nearest.

Example:
    >>> import numpy as np, keras_qx as qx
    >>> from keras_qx.data import digits_cnn
    >>> qat = qx.calibrate(qx.quantize(digits_cnn()), np.random.rand(64, 8, 8, 1))
    >>> qx.uncalibrated_ranges(qat)
    []
"""
from __future__ import annotations

import numpy as np

from keras_qx._deprecation import check_verbose
from keras_qx._graph import activation_sites, check_model, is_quantized_layer
from keras_qx._io import check_inputs, model_input_specs
from keras_qx.qat.gptq import run_gptq
from keras_qx.qat.quantize import _init_weight_ranges
from keras_qx.quant.quantizers import FixedRangeQuantizer

__all__ = ["calibrate", "uncalibrated_ranges"]

# tfmot's activation quantizers start at these ranges and keras_qx's at [-6, 6]: a range still
# exactly there has never seen data.
_INITIAL = {(-6.0, 6.0), (0.0, 0.0)}


class _Observer:
    """Stands in for an activation quantizer: passes values through and records their range
    per range variable (one quantizer may serve a pre- and a post-activation range)."""

    def __init__(self, quantizer, seen: dict, layer=None):
        self.quantizer, self.seen, self.layer = quantizer, seen, layer

    def __call__(self, inputs, training, weights, **kwargs):
        key = id(weights["min_var"])
        lo, hi = float(np.min(inputs)), float(np.max(inputs))
        old = self.seen.get(key, (lo, hi))
        self.seen[key] = (min(old[0], lo), max(old[1], hi))
        if self.layer is not None:  # its activations come after its weights: done with them
            _release_quantized_weights(self.layer)
        return inputs


def _swap(holder, key, value):
    if isinstance(holder, list):
        holder[key] = value
    else:
        setattr(holder, key, value)


def _sites(qat_model) -> list:
    return [s for s in activation_sites(qat_model) if not isinstance(_get(s[1], s[2]), FixedRangeQuantizer)]


def _get(holder, key):
    return holder[key] if isinstance(holder, list) else getattr(holder, key)


WEIGHT_ROUNDING = ("nearest", "gptq")


def calibrate(qat_model, x, batch_size: int = 64, *, weights: str = "nearest", verbose: int = 0):
    """Set every activation range of ``qat_model`` from samples ``x`` (in place; returns it).

    Args:
        qat_model: a model from ``qx.quantize`` (trained or not).
        x: samples shaped like the model input (a list, or a dict by input name, for several
            inputs); 100-500 typical training samples are enough.
        batch_size: samples per forward pass.
        weights: how kernels land on their grid. ``"nearest"``: each weight rounds to its nearest
            level, as QAT and the exporter do. ``"gptq"``: the quantized Dense, Conv1D, Conv2D
            and EinsumDense (a transformer's feed-forward and attention projections) kernels
            are rounded GPTQ-style (:mod:`keras_qx.qat.gptq`: layer by layer, the
            rounding error of each input column moved onto the others by the inverse Hessian of
            the layer's output error on ``x``), on the same grid (the step of each range
            variable), so the file holds exactly those integers; a lower-bit model without
            training keeps more of the float accuracy. Other kernels (DepthwiseConv, EinsumDense
            that contracts other than the input's trailing axes, Embedding, LSTM gates, grouped or transposed convs,
            pruned or clustered kernels, a layer called twice) keep round-to-nearest.
        verbose: 0 silent, 1 (or 2) a line per layer GPTQ rounds.

    Returns:
        ``qat_model``, whose ranges now cover the values ``x`` produces at every quantized
        tensor (weight ranges are reset from the current weights too, before GPTQ).

    Example:
        >>> qat = qx.calibrate(qx.quantize(model, {"default": {"weight_bits": 4}}), x_train[:256],
        ...                    weights="gptq")      # doctest: +SKIP
    """
    check_model(qat_model, "qat_model")
    if not isinstance(weights, str) or weights not in WEIGHT_ROUNDING:
        raise ValueError(f"calibrate(weights=...) must be one of {', '.join(map(repr, WEIGHT_ROUNDING))}, "
                         f"got {weights!r}.")
    verbose = check_verbose(verbose, "calibrate")
    if not any(is_quantized_layer(l) for l in qat_model.layers):
        raise ValueError(f"qat_model {qat_model.name!r} has no quantized layers; pass the model returned by "
                         "qx.quantize().")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
    xs = check_inputs(x, model_input_specs(qat_model), "x")
    _init_weight_ranges(qat_model)
    _observe_ranges(qat_model, xs, int(batch_size))
    if weights == "gptq":
        # Each layer's input as the quantized model computes it needs the ranges above; the
        # ranges are then observed again on the rounded model (weight ranges stay: they are the grid).
        run_gptq(qat_model, xs, int(batch_size), verbose=verbose)
        _observe_ranges(qat_model, xs, int(batch_size))
    for layer in qat_model.layers:
        _release_quantized_weights(layer)
    return qat_model


def _release_quantized_weights(layer) -> None:
    """Point a quantized layer's weights back at their variables, as after building. An eager
    call of a tfmot wrapper leaves its fake-quantized weights, a float copy of its kernel, set on
    the inner layer until the next call: a whole model's worth after a forward pass (measured:
    one copy of the weights still resident after calibrating the 334M encoder of
    bench/scale.py, and one more at the peak)."""
    sites = getattr(layer, "_weight_vars", None)
    if is_quantized_layer(layer) and sites:
        try:
            layer.quantize_config.set_quantize_weights(layer.layer, [w for w, _, _ in sites])
        except (ValueError, TypeError, AttributeError):
            pass  # a config whose weights are not plain attributes: the next call replaces them


def _observe_ranges(qat_model, xs: list, batch_size: int) -> None:
    """Every activation range of ``qat_model`` set to what ``xs`` produces there."""
    sites = _sites(qat_model)
    seen: dict = {}
    originals = [_get(holder, key) for _, holder, key, _ in sites]
    layers = {l.name: l for l in qat_model.layers}
    try:
        for (name, holder, key, _), quantizer in zip(sites, originals):
            if not isinstance(_get(holder, key), _Observer):
                _swap(holder, key, _Observer(quantizer, seen, layers.get(name)))
        for start in range(0, len(xs[0]), batch_size):
            batch = [xi[start:start + batch_size] for xi in xs]
            qat_model(batch if len(batch) > 1 else batch[0], training=False)
    finally:
        for (_, holder, key, _), quantizer in zip(sites, originals):
            _swap(holder, key, quantizer)
    for _, _, _, qvars in sites:
        lo, hi = seen.get(id(qvars["min_var"]), (None, None))
        if lo is None:
            continue  # a range the data never reaches (an unused branch)
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # TFLite needs 0 inside every range
        if hi - lo < 1e-6:
            hi = lo + 1e-6  # a constant-zero tensor: any small range represents it exactly
        qvars["min_var"].assign(np.full(qvars["min_var"].shape, lo, np.float32))
        qvars["max_var"].assign(np.full(qvars["max_var"].shape, hi, np.float32))


def uncalibrated_ranges(qat_model) -> list[str]:
    """Layers of ``qat_model`` with an activation range that has never seen data (still at its
    initial value): neither trained nor calibrated. Empty once the model is ready to export."""
    names = []
    for name, _, _, qvars in _sites(qat_model):
        bounds = (float(np.min(qvars["min_var"].numpy())), float(np.max(qvars["max_var"].numpy())))
        if bounds in _INITIAL and name not in names:
            names.append(name)
    return names
