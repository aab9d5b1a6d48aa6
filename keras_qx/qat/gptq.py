"""GPTQ rounding: a QAT model's Dense / Conv1D / Conv2D / EinsumDense kernels rounded onto their grid by
second-order error feedback (Frantar et al., 2022), layer by layer, from a few hundred samples.

Round-to-nearest rounds every weight on its own. GPTQ rounds a kernel's input columns one after
another and moves the rounding error of each onto the columns not yet rounded, weighted by the
inverse Hessian ``H = 2 X^T X / n`` of the layer's squared output error on the samples' inputs
``X``. Each layer sees its input as the QAT model computes it (earlier layers already rounded,
activations quantized). The grid is the layer quantizer's own: the step from its range variables,
as the exporter reads them, and its integer limits (narrow, or full range at 2 bits), so the
kernel written back (integers * step) is what the fake-quant and the file reproduce exactly.

``qx.calibrate(qat, x, weights="gptq")`` runs it after setting the activation ranges.

Example:
    >>> import numpy as np, keras_qx as qx
    >>> from keras_qx.data import digits_cnn
    >>> qat = qx.calibrate(qx.quantize(digits_cnn()), np.random.rand(64, 8, 8, 1), weights="gptq")
    >>> qx.uncalibrated_ranges(qat)
    []
"""
from __future__ import annotations

import numpy as np

from keras_qx._compat import keras, tf
from keras_qx._graph import is_quantized_layer
from keras_qx.quant.kinds import kernel_kind
from keras_qx.quant.quantizers import WeightQuantizer, grid_limits

__all__ = ["gptq_layers", "gptq_round", "run_gptq"]

_L = keras.layers
_KINDS = (_L.Dense, _L.Conv1D, _L.Conv2D, _L.EinsumDense)  # kernel_kind's layer_type: exactly these
BLOCK = 128


def einsum_contracted(layer) -> int | None:
    """How many leading kernel axes an ``EinsumDense`` contracts with its input's trailing axes
    (a Dense on sequences ``abc,cz->abz``: 1; an attention output ``abcd,cde->abe``: 2), or None
    where the contraction is another shape (GPTQ then leaves the layer to round-to-nearest)."""
    equation = getattr(layer, "equation", None)
    if not isinstance(equation, str) or "..." in equation:
        return None
    try:
        lhs, out = equation.replace(" ", "").split("->")
        x_spec, k_spec = lhs.split(",")
    except ValueError:
        return None
    contracted = [c for c in k_spec if c in x_spec and c not in out]
    n = len(contracted)
    if not n or x_spec[-n:] != "".join(contracted) or k_spec[:n] != "".join(contracted):
        return None
    if any(c in x_spec for c in k_spec[n:]):  # a kernel axis shared with the input but kept: not a matmul
        return None
    return n


def kernel_site(layer):
    """``(kernel variable, quantizer, range vars)`` of a wrapper GPTQ can round, else None."""
    inner = getattr(layer, "layer", None)
    if not is_quantized_layer(layer) or inner is None:
        return None
    kind = kernel_kind(inner)
    if kind is None or kind.layer_type not in _KINDS or len(layer._inbound_nodes) != 1:
        return None
    if getattr(inner, "groups", 1) != 1 or getattr(inner, "data_format", "channels_last") != "channels_last":
        return None
    sites = getattr(layer, "_weight_vars", [])
    if len(sites) != 1:
        return None
    weight, quantizer, qvars = sites[0]
    # Pruned / clustered / gate quantizers keep their own constraints: round-to-nearest for them.
    if type(quantizer) is not WeightQuantizer or not qvars:
        return None
    if kind.layer_type is _L.EinsumDense:
        return (weight, quantizer, qvars) if einsum_contracted(inner) else None
    rank = {_L.Dense: 2, _L.Conv1D: 3, _L.Conv2D: 4}[kind.layer_type]
    return (weight, quantizer, qvars) if len(weight.shape) == rank else None


def _inputs_of(layer, kernel_shape) -> int:
    """The kernel's input size: the rows of its ``(inputs, outputs)`` matrix."""
    inner = layer.layer
    if isinstance(inner, _L.EinsumDense):
        return int(np.prod(kernel_shape[:einsum_contracted(inner)]))
    return int(np.prod(kernel_shape[:-1]))


def gptq_layers(qat_model) -> list:
    """The layers of ``qat_model`` whose kernels GPTQ rounds (in topological order): quantized
    Dense, Conv1D and Conv2D (one call each, groups=1, channels last, plain ``WeightQuantizer``)
    and EinsumDense whose kernel contracts the input's trailing axes (a transformer's
    feed-forward and attention projections, :func:`einsum_contracted`)."""
    return [layer for layer in qat_model.layers if kernel_site(layer) is not None]


def grid_of(quantizer: WeightQuantizer, qvars: dict, channels: int) -> tuple[np.ndarray, int, int]:
    """``(step per output channel (float32), lowest, highest integer)`` of a kernel quantizer
    at its current range variables, as the fake-quant and the exporter compute it."""
    low = np.asarray(qvars["min_var"].numpy(), np.float32)
    high = np.asarray(qvars["max_var"].numpy(), np.float32)
    step = np.asarray(quantizer.step_for(low, high), np.float32)
    step = np.where(step > 0, step, np.float32(1)).astype(np.float32)
    return (np.broadcast_to(step.reshape(-1), (channels,)).astype(np.float32),
            *grid_limits(quantizer.bits, quantizer.full_range))


def gptq_round(w: np.ndarray, hessian: np.ndarray, step: np.ndarray, lowest: int, highest: int,
               damp: float = 0.01, block: int = BLOCK) -> np.ndarray:
    """The GPTQ integers of kernel ``w`` (inputs, outputs) on the grid ``step`` (per output)
    x ``lowest..highest``, for the input Hessian ``hessian`` (inputs, inputs): int32, ``w``'s shape.

    Columns (inputs) go in order of decreasing Hessian diagonal (act-order; the steps are per
    output, so any order lands on the same grid); dead inputs (diagonal 0) get 0.

    Example:
        >>> w = np.array([[0.3, -0.2], [0.1, 0.45]]); x = np.random.default_rng(0).normal(size=(50, 2))
        >>> gptq_round(w, 2 * x.T @ x / 50, np.array([0.1, 0.1]), -7, 7).shape
        (2, 2)
    """
    W = np.array(w, np.float64).T  # (outputs, inputs): GPTQ's rows
    H = np.array(hessian, np.float64)
    step64 = np.asarray(step, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = np.argsort(-np.diag(H), kind="stable")
    W, H = W[:, order], H[np.ix_(order, order)]
    n = H.shape[0]
    mean_diag = float(np.mean(np.diag(H)))
    for attempt in range(8):  # more dampening where the Hessian is near singular
        try:
            L_inv = np.linalg.inv(np.linalg.cholesky(H + (damp * 10 ** attempt) * mean_diag * np.eye(n)))
            Hinv = np.linalg.cholesky(L_inv.T @ L_inv).T  # the upper Cholesky factor of H^-1
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise np.linalg.LinAlgError("GPTQ: the input Hessian is not positive definite even when dampened.")
    Q = np.zeros(W.shape, np.int64)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Hinv1 = W[:, i1:i2].copy(), Hinv[i1:i2, i1:i2]
        Err1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            ints = np.clip(np.floor(col / step64 + 0.5), lowest, highest)
            Q[:, i1 + i] = ints
            err = (col - ints * step64) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    out = np.empty_like(Q)
    out[:, order] = Q
    return out.T.astype(np.int32)


def _patches(layer, x: tf.Tensor) -> np.ndarray:
    """The rows the layer's kernel multiplies: ``(rows, kernel inputs)`` in the kernel's
    ``reshape(-1, outputs)`` order (Conv: im2col patches, flattened (kh, kw, cin))."""
    inner = layer.layer
    x = tf.convert_to_tensor(x, tf.float32)
    if isinstance(inner, _L.Conv1D) and not isinstance(inner, _L.Conv2D):
        padding = inner.padding
        if padding == "causal":
            x = tf.pad(x, [[0, 0], [inner.dilation_rate[0] * (inner.kernel_size[0] - 1), 0], [0, 0]])
            padding = "valid"
        x = x[:, None]
        sizes, strides, rates = (1, inner.kernel_size[0]), (1, inner.strides[0]), (1, inner.dilation_rate[0])
    elif isinstance(inner, _L.Conv2D):
        padding, sizes, strides, rates = inner.padding, inner.kernel_size, inner.strides, inner.dilation_rate
    elif isinstance(inner, _L.EinsumDense):
        n = einsum_contracted(inner)
        return x.numpy().reshape(-1, int(np.prod(x.shape[-n:])))
    else:
        return x.numpy().reshape(-1, x.shape[-1])
    patches = tf.image.extract_patches(x, sizes=[1, *sizes, 1], strides=[1, *strides, 1], rates=[1, *rates, 1],
                                       padding=padding.upper())
    return patches.numpy().reshape(-1, patches.shape[-1])


def _as_list(x):
    return x if len(x) > 1 else x[0]


def run_gptq(qat_model, xs: list, batch_size: int, verbose: int = 0) -> dict:
    """GPTQ on every layer of :func:`gptq_layers` in order, in place: each kernel variable
    becomes its integers * step (range variables unchanged). ``xs``: one array per model input.

    Returns ``{layer name: (GPTQ's, round-to-nearest's) output error on the samples}``, each
    ``tr((W - Wq) H (W - Wq)^T)`` summed over output channels, on the layer's input as the model
    computes it (earlier layers already rounded).
    """
    layers = gptq_layers(qat_model)
    errors = {}
    for index, layer in enumerate(layers, 1):
        weight, quantizer, qvars = kernel_site(layer)
        inputs = keras.Model(qat_model.inputs, layer.input)
        kernel = weight.numpy()
        w = kernel.reshape(_inputs_of(layer, kernel.shape), -1)
        hessian, rows = np.zeros((w.shape[0], w.shape[0])), 0
        for start in range(0, len(xs[0]), batch_size):
            batch = [xi[start:start + batch_size] for xi in xs]
            X = _patches(layer, inputs(_as_list(batch), training=False)).astype(np.float64)
            hessian += 2.0 * X.T @ X
            rows += len(X)
        hessian /= max(rows, 1)
        step, lowest, highest = grid_of(quantizer, qvars, w.shape[1])
        ints = gptq_round(w, hessian, step, lowest, highest)
        nearest = np.clip(np.floor(w.astype(np.float32) / step + np.float32(0.5)), lowest, highest)
        errors[layer.name] = tuple(float(np.einsum("ij,ik,kj->", d, hessian, d) / 2) for d in (
            w - ints * step.astype(np.float64), w - nearest * step.astype(np.float64)))
        weight.assign((ints.astype(np.float32) * step).reshape(kernel.shape))
        if verbose:
            gptq_err, rtn_err = errors[layer.name]
            print(f"gptq {index}/{len(layers)} {layer.name}: {w.shape[0]} inputs x {w.shape[1]} outputs, "
                  f"{quantizer.bits}-bit, output error on x {gptq_err:.4g} (nearest {rtn_err:.4g})", flush=True)
    return errors
