"""Put each bias of a QAT model on the int32 grid the TFLite file stores it on.

TFLite keeps the bias of a CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED as int32 in steps of
``input_scale * weight_scale`` (per output channel), so the file adds ``round(b / step) * step``
where the QAT simulation adds ``b``. The difference is at most half of that step, a few
thousandths of an output step, but it moves values that lie that close to a rounding boundary
to the other side: measured with ``keras_qx.lite.fidelity.compare_layers`` (own error), 0.1-0.5%
of every convolution's outputs differ by one step, and an untrained network amplifies those
scattered one-step differences to several output steps (the small RegNet of tests/families.py:
1.04 / 4 steps mean / max at the output; 0.08 / 2 with the biases on the grid).

:func:`snap_biases` moves each bias (or, for a convolution folded with the BatchNormalization
after it, that BN's ``beta``) onto the grid, computed from the QAT model's own ranges: the step
of the layer's input quantizer times its kernel quantizer's per-channel step (times the BN gain
``|gamma / sqrt(var + eps)|`` that the converter folds into the kernel). The file then stores the
same bias as before and the simulation adds exactly that bias. ``export_tflite`` calls it before
converting.

Example:
    >>> from keras_qx.lite.bias_grid import snap_biases             # doctest: +SKIP
    >>> snap_biases(qat)                                             # doctest: +SKIP
    17
"""
from __future__ import annotations

import numpy as np

from keras_qx._compat import keras, quantize_layer, quantize_wrapper
from keras_qx._graph import inbound_layers, outbound_layers
from keras_qx.quant.quantizers import FixedRangeQuantizer, WeightQuantizer
from keras_qx.rewrite.scale_shift import ScaleShiftBatchNormalization
from keras_qx.rewrite.tfop import VALUE_PRESERVING, TFOp

__all__ = ["snap_biases", "input_step"]

_L = keras.layers
# Layers whose output carries their input's quantization (no requantization in the file).
_PASS_THROUGH = (_L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D, _L.Reshape, _L.Flatten, _L.Dropout,
                 _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D, _L.AveragePooling1D, _L.AveragePooling2D,
                 _L.AveragePooling3D, _L.Cropping1D, _L.Cropping2D, _L.Permute, _L.GlobalMaxPooling1D,
                 _L.GlobalMaxPooling2D, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.GaussianNoise,
                 _L.GaussianDropout, _L.ActivityRegularization)


def _step(quantizer, qvars) -> np.ndarray | None:
    """The quantization step of a fake-quantizer with range variables ``qvars``."""
    if isinstance(quantizer, FixedRangeQuantizer):
        return np.float64(quantizer.step)
    if not qvars or "min_var" not in qvars:
        return None
    bits = getattr(quantizer, "bits", None) or getattr(quantizer, "num_bits", 8)
    narrow = isinstance(quantizer, WeightQuantizer) or bool(getattr(quantizer, "narrow_range", False))
    lo = np.asarray(qvars["min_var"].numpy(), np.float64)
    hi = np.asarray(qvars["max_var"].numpy(), np.float64)
    if isinstance(quantizer, WeightQuantizer):
        return quantizer.step_for(lo, hi)
    else:  # the range always contains zero
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    return (hi - lo) / (2 ** int(bits) - 1 - int(narrow))


def _output_step(layer, depth: int = 0):
    """The quantization step of ``layer``'s output in the file, or None if unknown."""
    if depth > 50:
        return None
    if isinstance(layer, quantize_layer.QuantizeLayer):
        return _step(layer.quantizer, getattr(layer, "quantizer_vars", None))
    inner = layer
    if isinstance(layer, quantize_wrapper.QuantizeWrapper):
        if getattr(layer, "_output_quantizers", None):
            return _step(layer._output_quantizers[0], layer._output_quantizer_vars)
        for act in getattr(layer, "_quantize_activations", []):
            if hasattr(act, "_post_activation_vars"):
                return _step(act.quantizer, act._post_activation_vars)
        inner = layer.layer
    passes = isinstance(inner, _PASS_THROUGH) or (isinstance(inner, TFOp) and inner.symbol in VALUE_PRESERVING
                                                  and inner.symbol not in ("concat", "stack"))
    feeds = inbound_layers(layer)
    if passes and len(feeds) == 1:
        return _output_step(feeds[0], depth + 1)
    return None


def input_step(layer):
    """The quantization step of a (single-input) layer's input in the file, or None."""
    feeds = inbound_layers(layer)
    return _output_step(feeds[0]) if len(feeds) == 1 else None


def _kernel_step(wrapper):
    """Per-output-channel (or scalar) step of the wrapper's first kernel, or None."""
    for weight, quantizer, qvars in getattr(wrapper, "_weight_vars", []):
        if isinstance(quantizer, WeightQuantizer):
            step = _step(quantizer, qvars)
            if isinstance(wrapper.layer, _L.DepthwiseConv2D) and np.ndim(step) == 1:
                # depthwise_kernel (h, w, in, multiplier): output channel i * multiplier + j
                step = np.tile(step, int(weight.shape[-2]))
            return step
        return None
    return None


def _folded_bn(wrapper):
    """The plain BatchNormalization the converter folds into this kernel layer (its only
    consumer, fed only by it), or None."""
    after = outbound_layers(wrapper)
    if len(after) != 1 or len(inbound_layers(after[0])) != 1:
        return None
    inner = getattr(after[0], "layer", after[0])
    if type(inner) is _L.BatchNormalization:
        return inner
    return None


def _bn_gain(bn):
    gain = 1.0 / np.sqrt(bn.moving_variance.numpy().astype(np.float64) + bn.epsilon)
    return gain * bn.gamma.numpy().astype(np.float64) if bn.scale else gain


def _snap(value, step):
    return np.round(value / step) * step


def snap_biases(qat_model) -> int:
    """Move every bias of ``qat_model`` that TFLite stores as int32 onto that int32 grid (in
    place; each moves by at most half a grid step); return how many layers were moved."""
    moved = 0
    for layer in qat_model.layers:
        inner = getattr(layer, "layer", None)
        if not isinstance(layer, quantize_wrapper.QuantizeWrapper) or inner is None:
            continue
        if isinstance(inner, ScaleShiftBatchNormalization) and inner.center and inner._plain():
            # one DEPTHWISE_CONV_2D: weight m per channel stored as +-127 steps of |m| / 127
            x_step = input_step(layer)
            if x_step is None:
                continue
            m = _bn_gain(inner)
            step = x_step * np.abs(m) / 127
            total = inner.beta.numpy().astype(np.float64) - inner.moving_mean.numpy().astype(np.float64) * m
            inner.beta.assign((inner.beta.numpy() + (_snap(total, step) - total)).astype(np.float32))
            moved += 1
            continue
        if not isinstance(inner, (_L.Conv1D, _L.Conv2D, _L.DepthwiseConv2D, _L.Dense)) or isinstance(
                inner, (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose)):
            continue
        w_step, x_step = _kernel_step(layer), input_step(layer)
        if w_step is None or x_step is None or not np.all(np.asarray(w_step) > 0):
            continue
        bias = inner.bias.numpy().astype(np.float64) if inner.use_bias else None
        bn = _folded_bn(layer)
        if bn is not None and bn.center and np.ndim(w_step) == 1:
            m = _bn_gain(bn)
            step = x_step * w_step * np.abs(m)
            total = ((0.0 if bias is None else bias) - bn.moving_mean.numpy().astype(np.float64)) * m \
                + bn.beta.numpy().astype(np.float64)
            bn.beta.assign((bn.beta.numpy() + (_snap(total, step) - total)).astype(np.float32))
            moved += 1
        elif bn is None and bias is not None:
            inner.bias.assign(_snap(bias, x_step * w_step).astype(np.float32))
            moved += 1
    return moved
