"""``qx.sensitivity``: how much damage quantizing each layer alone to each bit width does.

Three methods, cheapest first:

* ``"sqnr"``: relative quantization noise of the kernel, ``||Q(w) - w||^2 / ||w||^2``.
  Data-free; blind to how much the loss cares about the layer.
* ``"hessian"`` (HAWQ-V2): ``mean(diag H) * ||Q(w) - w||^2`` with the Hessian trace of the
  loss w.r.t. the kernel estimated by Hutchinson's method (Rademacher probes,
  Hessian-vector products by double back-propagation). A second-order estimate of the
  loss increase.
* ``"loss"`` (default): the measured loss increase with that layer's kernel fake-quantized
  (on the same grid as ``WeightQuantizer``) and every other layer float. Direct, and on
  small models as cheap as the others; ``bench/sensitivity.py`` compares the three.

Example:
    >>> report = qx.sensitivity(model, (x, y), candidates=(2, 4, 8))   # doctest: +SKIP
    >>> report.table(); report.plot("sensitivity.png")                 # doctest: +SKIP
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from keras_qx._compat import keras, tf
from keras_qx._deprecation import check_verbose, warn_renamed
from keras_qx._graph import check_float_model
from keras_qx._io import legacy_xy
from keras_qx.quant.kinds import kernel_kind
from keras_qx.quant.cost import kernel_bytes, kernel_params
from keras_qx.quant.quantizers import WEIGHT_BITS, check_bits, full_range_for, grid_integers
from keras_qx.rewrite.keras3 import as_tf_keras

__all__ = ["sensitivity", "SensitivityReport", "fake_quantize", "quantizable_layers", "infer_loss",
           "check_targets", "METHODS"]

METHODS = ("loss", "hessian", "sqnr")


def fake_quantize(w: np.ndarray, bits: int, per_channel: bool, channel_axis: int = -1,
                  full_range: bool = False) -> np.ndarray:
    """Numpy twin of :class:`~keras_qx.quant.quantizers.WeightQuantizer`: the kernel QAT computes
    with (:func:`~keras_qx.quant.quantizers.grid_integers` times its step; ties round half up,
    as TF's FakeQuantWithMinMaxVars does, so a weight between two levels lands where QAT puts it)."""
    ints, step = grid_integers(w, bits, per_channel, channel_axis, full_range)
    return (ints * step).astype(w.dtype)


def quantizable_layers(model) -> list:
    """Layers whose kernels the policy can set (kinds TFLite stores as integers)."""
    check_float_model(model)
    from keras_qx.rewrite.flatten import flatten_nested

    return [l for l in flatten_nested(model, copies=False).layers if kernel_kind(l) is not None and kernel_kind(l).integer_export]


def infer_loss(model, y):
    """The model's compiled loss, else cross-entropy for labels (class ids, or one-hot rows;
    logits unless the last layer ends in softmax), else MSE."""
    if getattr(model, "compiled_loss", None) is not None and isinstance(model.loss, (str, keras.losses.Loss)):
        return keras.losses.get(model.loss) if isinstance(model.loss, str) else model.loss
    y = np.asarray(y)
    out_dim = int(model.output_shape[-1] or 1)
    last = model.layers[-1]
    from_logits = getattr(getattr(last, "activation", None), "__name__", "") != "softmax" and not isinstance(
        last, keras.layers.Softmax)
    if out_dim > 1 and y.ndim == 1 and _integral(y):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    if _one_hot(y, out_dim):
        return keras.losses.CategoricalCrossentropy(from_logits=from_logits)
    return keras.losses.MeanSquaredError()


def _integral(y: np.ndarray) -> bool:
    """Integer ids, possibly stored as floats (labels read from a CSV)."""
    return y.dtype.kind in "iu" or (y.dtype.kind == "f" and bool(np.isfinite(y).all())
                                     and np.array_equal(y, np.round(y)))


def _one_hot(y: np.ndarray, classes: int) -> bool:
    """``y`` is one-hot rows ``(n, classes)``: 0/1 values, one 1 per row."""
    return (classes > 1 and y.ndim == 2 and y.shape[1] == classes and y.dtype.kind in "biuf"
            and bool(np.isin(y, (0, 1)).all()) and bool((y.sum(1) == 1).all()))


ELEMENTWISE_LOSSES = frozenset({
    "mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error", "huber", "log_cosh", "binary_crossentropy", "binary_focal_crossentropy",
    "categorical_crossentropy", "categorical_focal_crossentropy", "categorical_hinge", "hinge", "squared_hinge",
    "kl_divergence", "poisson", "cosine_similarity"})
"""Losses (by function name) that compare the targets to the output element by element: ``y``
must have the output's shape (a trailing axis of 1 aside)."""


def _loss_name(loss_fn) -> tuple[str, str]:
    """``(kind, name)``: the loss function's name (``mean_squared_error``), and what to call it
    in an error (the class name of a Loss object, else the function's name)."""
    fn = getattr(loss_fn, "fn", loss_fn)  # a Loss instance wraps its function
    kind = getattr(fn, "__name__", "")
    name = type(loss_fn).__name__ if isinstance(loss_fn, keras.losses.Loss) else kind or type(loss_fn).__name__
    return kind, name


def _shapes_match(y_tail: tuple, out_tail: tuple) -> bool:
    """Targets shaped ``(n, *y_tail)`` fit an output ``(n, *out_tail)`` as Keras losses line them
    up (``None`` matches any size; a trailing axis of 1 on either side is squeezed)."""
    if len(y_tail) == len(out_tail):
        return all(o is None or o == t for t, o in zip(y_tail, out_tail))
    if len(y_tail) + 1 == len(out_tail) and out_tail[-1] in (1, None):
        return _shapes_match(y_tail, out_tail[:-1])
    if len(y_tail) == len(out_tail) + 1 and y_tail[-1] == 1:
        return _shapes_match(y_tail[:-1], out_tail)
    return False


def _from_logits(model) -> bool:
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    return activation not in ("softmax", "sigmoid") and not isinstance(last, keras.layers.Softmax)


def check_targets(model, x, y, loss=None, what: str = "y", n: int | None = None):
    """``(loss_fn, y)``: the loss (``loss``, else the model's compiled one, else inferred from
    ``y``) and the targets ``y`` checked against it and the model's output before any work.

    One check for every entry that scores a model on user data (``qx.sensitivity``,
    ``qx.auto_policy``, ``BitWidthTuner.search``, the CLI), so a mistake in the data is named
    with the loss, the label shape, the output shape and the fix instead of surfacing as
    TensorFlow's graph error from inside a trial: labels not one per sample, one-hot rows for
    a sparse cross-entropy, class ids for a categorical one or for an element-wise loss (MSE
    on a 10-unit output), a binary cross-entropy on class ids or on a 10-unit output; any other
    loss is run on two samples and its error re-raised with the shapes.

    ``x`` is the checked samples (an array, or a list per input) or their first few, with ``n``
    the number of samples; for a sparse cross-entropy ``y`` comes back as integer ids (``(n, 1)``
    columns flattened)."""
    from keras_qx._io import check_labels

    if n is None:
        n = len(x[0]) if isinstance(x, (list, tuple)) else len(x)
    if y is None:
        raise ValueError(f"{what} is None: pass targets, one per sample ({n} samples), e.g. qx.sensitivity(model, x, y).")
    if loss is not None:
        loss_fn = keras.losses.get(loss)
        origin = "the loss"
    else:
        compiled = getattr(model, "compiled_loss", None) is not None and isinstance(model.loss, (str, keras.losses.Loss))
        loss_fn = infer_loss(model, y)
        origin = "the model's compiled loss" if compiled else "the loss inferred from the targets,"
    if len(getattr(model, "outputs", None) or [None]) > 1:
        return loss_fn, y  # several outputs: their targets are checked by the caller (a list or dict)
    try:
        y = np.asarray(y)
    except ValueError as err:
        raise TypeError(f"{what} must be an array of targets, got something ragged: {err}") from None
    if y.ndim == 0 or len(y) != n:
        raise ValueError(f"{what.replace('y', 'x', 1)} has {n} samples but {what} has {len(y) if y.ndim else 1} "
                         "targets; pass one target per sample.")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{what} must be numeric targets, got {y.dtype} values such as {y.ravel()[:3].tolist()}; "
                        "map class names to ids first, e.g. np.unique(y, return_inverse=True)[1].")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise ValueError(f"{what} contains {int((~np.isfinite(y)).sum())} NaN/inf values; clean the targets.")
    kind, name = _loss_name(loss_fn)
    loss_text = f"{origin} {name}"
    out_shape = tuple(model.output_shape)
    out_tail = out_shape[1:]
    units = int(out_tail[-1]) if out_tail and out_tail[-1] is not None else 1
    ids = y.ndim == 1 and _integral(y)
    sparse_fix = (f"compile the model with keras.losses.SparseCategoricalCrossentropy(from_logits={_from_logits(model)})"
                  " (or pass loss=...)")
    if kind.startswith("sparse_categorical"):
        if y.ndim == 2 and y.shape[1] == units > 1 and _one_hot(y, units):
            raise ValueError(f"{what} looks one-hot (shape {y.shape}), but {loss_text} takes integer class ids; "
                             f"pass {what}.argmax(-1), or compile the model with CategoricalCrossentropy.")
        if units == 1 and ids and len(y) and y.max() > 0:
            raise ValueError(f"{loss_text} takes class ids below the model's output units, but the model outputs "
                             f"{out_shape} (one unit) and {what} holds ids {int(y.min())}..{int(y.max())}: for 0/1 "
                             "labels compile with keras.losses.BinaryCrossentropy; for more classes give the model "
                             "one output unit per class.")
        y = check_labels(y, n, what, units)
    elif kind.startswith("categorical_") and y.ndim == 1:
        raise ValueError(f"{what} holds class ids (shape {y.shape}), but {loss_text} takes one-hot rows "
                         f"(n, {units}); pass keras.utils.to_categorical({what}, {units}), or {sparse_fix}.")
    elif kind.startswith("binary_") and units > 1 and ids:
        raise ValueError(f"{loss_text} scores each of the model's {units} output units as its own yes/no and "
                         f"takes targets shaped (n, {units}), but {what} holds class ids shaped {y.shape} "
                         f"(model output {out_shape}): for one class per sample {sparse_fix}; for multi-label "
                         f"targets pass 0/1 rows shaped (n, {units}).")
    elif kind.startswith("binary_") and len(y) and (y.min() < 0 or y.max() > 1):
        raise ValueError(f"{loss_text} takes 0/1 targets (probabilities), but {what} (shape {y.shape}) holds values "
                         f"{y.min():g}..{y.max():g} and the model outputs {out_shape}: for class ids give the model "
                         f"one output unit per class and {sparse_fix}.")
    elif kind in ELEMENTWISE_LOSSES and not _shapes_match(y.shape[1:], out_tail):
        hint = (f"if {what} holds class ids, {sparse_fix}, or one-hot the labels with "
                f"keras.utils.to_categorical({what}, {units})" if ids and units > 1 and y.min() >= 0
                and y.max() < units else
                f"pass targets shaped (n, {', '.join(str(d) for d in out_tail)}) like the output, or a loss for "
                "these targets")
        raise ValueError(f"{loss_text} compares {what} with the model's output element by element, but {what} has "
                         f"shape {y.shape} and the model outputs {out_shape}; {hint}.")
    _probe_loss(model, loss_fn, x, y, loss_text, what, out_shape)
    return loss_fn, y


def _probe_loss(model, loss_fn, x, y, loss_text, what, out_shape) -> None:
    """Run the loss on two samples: a loss the checks above do not know (a custom one) fails
    here with the shapes named instead of inside a compiled graph."""
    try:
        xb = [xi[:2] for xi in x] if isinstance(x, (list, tuple)) else x[:2]
        pred = model(xb, training=False)
    except Exception:  # noqa: BLE001 - the model's own errors are reported where it runs
        return
    try:
        loss_fn(tf.constant(y[:2]), pred)
    except (ValueError, TypeError, tf.errors.OpError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ValueError(f"{loss_text} cannot score {what} (shape {y.shape}) against the model's output "
                         f"{out_shape}: {first[:300]}. Pass targets the loss takes, or compile the model with a "
                         "loss for these targets (or pass loss=...).") from None


def _kernels(layer):
    kind = kernel_kind(layer)
    return [getattr(layer, attr) for attr in kind.weight_attrs]


@dataclass
class SensitivityReport:
    """Per layer and candidate bit width: the damage (see ``method``) and kernel bytes."""

    method: str
    candidates: tuple
    damage: dict  # {layer: {bits: float}}
    kernel_bytes: dict  # {layer: {bits: int}} from the shared cost model
    params: dict  # {layer: kernel parameter count}
    types: dict = field(default_factory=dict)
    seconds: float = 0.0
    baseline_loss: float | None = None

    @property
    def layers(self) -> list[str]:
        return list(self.damage)

    def to_dict(self) -> dict:
        return {"method": self.method, "candidates": list(self.candidates), "seconds": self.seconds,
                "baseline_loss": self.baseline_loss,
                "layers": {n: {"type": self.types.get(n), "params": self.params[n],
                               "damage": {str(b): v for b, v in self.damage[n].items()},
                               "kernel_bytes": {str(b): v for b, v in self.kernel_bytes[n].items()}}
                           for n in self.damage}}

    def table(self, print_fn=None) -> str:
        """The report as text (one row per layer, one column per width); print it yourself."""
        head = ["Layer", "Type", "Params"] + [f"{b}-bit" for b in self.candidates]
        rows = [[n, self.types.get(n, ""), f"{self.params[n]:,}"] + [f"{self.damage[n][b]:.4g}" for b in self.candidates]
                for n in self.damage]
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        fmt = "  ".join(("{:<%d}" if i < 2 else "{:>%d}") % w for i, w in enumerate(widths))
        lines = [f"Sensitivity ({self.method}; damage if only that layer is quantized)", fmt.format(*head)]
        lines += [fmt.format(*r) for r in rows]
        if print_fn is not None:
            warn_renamed("SensitivityReport.table()", "print_fn=", "print(report.table())")
            for line in lines:
                print_fn(line)
        return "\n".join(lines)

    def plot(self, path=None, ax=None):
        """Grouped bars: one group per layer, one bar per bit width (log scale)."""
        from keras_qx._plot import axes, finish

        fig, ax = axes(ax, figsize=(max(5, 1.2 * len(self.damage)), 3.5))
        names = self.layers
        width = 0.8 / len(self.candidates)
        for i, bits in enumerate(self.candidates):
            values = [max(self.damage[n][bits], 1e-12) for n in names]
            ax.bar(np.arange(len(names)) + i * width, values, width, label=f"{bits}-bit")
        ax.set_xticks(np.arange(len(names)) + width * (len(self.candidates) - 1) / 2)
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel(f"damage ({self.method})")
        ax.legend()
        ax.set_title("Per-layer sensitivity")
        finish(fig, path)
        return ax


def _progress(total: int, verbose: bool, label: str = "sensitivity"):
    """A one-line progress bar on stderr (stdout stays for results): ``step(i)`` after the i-th of
    ``total`` steps, ``step(i, what)`` naming it."""
    start = time.perf_counter()

    def step(i, what: str = ""):
        if verbose:
            done = int(30 * i / max(total, 1))
            shown = f"{what[:40]:40s} " if what else ""
            sys.stderr.write(f"\r{label} [{'=' * done}{'.' * (30 - done)}] {i}/{total} {shown}"
                             f"{time.perf_counter() - start:.1f}s" + ("\n" if i == total else ""))
            sys.stderr.flush()
    return step


def _loss_evaluator(model, loss_fn, x, y, batch_size):
    """A compiled mean-loss function over fixed batches (traced once, reused per evaluation)."""
    batches = [(tf.constant(x[i:i + batch_size]), tf.constant(y[i:i + batch_size]))
               for i in range(0, len(x), batch_size)]

    @tf.function(reduce_retracing=True)
    def batch_loss(xb, yb):
        return tf.reduce_mean(loss_fn(yb, model(xb, training=False)))  # loss functions give per-sample

    def mean_loss():
        return sum(float(batch_loss(xb, yb)) * len(xb) for xb, yb in batches) / len(x)
    return mean_loss


def _hessian_traces(model, layers, loss_fn, x, y, probes: int, seed: int, batch_size: int = 32) -> dict:
    """Hutchinson estimate of tr(H) of the loss w.r.t. each layer's kernels.

    The mean loss's Hessian is the sample-weighted mean of the batches' Hessians, so each probe's
    ``v^T H v`` is summed over batches of ``batch_size``: the double backward pass holds one
    batch's activations, not the whole sample's (108M-parameter encoder, 64 samples: see
    bench/results/scale.md). Probes are drawn in the graph (stateless, from ``seed``), not copied
    in from the host."""
    kernels = [k for l in layers for k in _kernels(l)]
    owner = [l.name for l in layers for _ in _kernels(l)]
    traces = {l.name: 0.0 for l in layers}
    batches = [(tf.convert_to_tensor(x[i:i + batch_size]), tf.convert_to_tensor(y[i:i + batch_size]))
               for i in range(0, len(x), batch_size)]

    @tf.function(reduce_retracing=True)
    def v_hessian_v(xb, yb, probe):
        vs = [tf.sign(tf.random.stateless_uniform(k.shape, seed=tf.stack([probe, i]), minval=-1.0, maxval=1.0))
              for i, k in enumerate(kernels)]
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_mean(loss_fn(yb, model(xb, training=False)))
            grads = inner.gradient(loss, kernels)
            gv = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vs)])
        return [tf.reduce_sum(hv * v) for hv, v in zip(outer.gradient(gv, kernels), vs)]

    for p in range(probes):
        probe = tf.constant((seed * 1000003 + p) % 2 ** 31, tf.int32)
        for xb, yb in batches:
            weight = len(xb) / len(x) / probes
            for name, value in zip(owner, v_hessian_v(xb, yb, probe)):
                traces[name] += float(value) * weight
    return traces


def sensitivity(model, x=None, y=None, candidates=(2, 4, 8), *, method: str = "loss", loss=None,
                max_samples: int | None = None, batch_size: int = 512, hessian_probes: int = 8,
                seed: int = 0, verbose: int = 1, data=None) -> SensitivityReport:
    """Per-layer, per-bit-width sensitivity of a float model.

    Args:
        model: a built tf_keras model (float; weights are restored afterwards), or a Keras 3
            Sequential/Functional one of standard layers (rebuilt as tf_keras first).
        x, y: samples and targets, as ``Model.fit`` takes them (not needed for "sqnr"); at most
            ``max_samples`` samples are used (default 512 for "loss", 256 for "hessian": each
            probe back-propagates twice). ``data=(x, y)`` is the deprecated form.
        candidates: bit widths to score (2..8).
        method: ``"loss"``, ``"hessian"`` or ``"sqnr"`` (see the module docstring).
        loss: a Keras loss; default: the compiled loss, else inferred from ``y``.
        verbose: 0 silent, 1 a progress bar.

    Example:
        >>> report = qx.sensitivity(model, x_train, y_train, (2, 4, 8))   # doctest: +SKIP
        >>> print(report.table())                                       # doctest: +SKIP

    Raises:
        ValueError: before any work, if the targets do not fit the loss and the model's output
            (:func:`check_targets`: e.g. class ids to a model compiled with MSE), naming the
            loss, both shapes and the fix.
    """
    model = as_tf_keras(model)
    if data is None and isinstance(y, tuple) and y and all(isinstance(b, int) and 1 <= b <= 8 for b in y) \
            and (x is None or (isinstance(x, (tuple, list)) and len(x) == 2)):
        # the old positional form sensitivity(model, (x, y), (2, 4, 8)) / sensitivity(model, None, (2, 4))
        warn_renamed("qx.sensitivity()", "candidates as the third positional argument", "candidates=")
        y, candidates = None, y
    x, y = legacy_xy("qx.sensitivity()", x, y, len(model.inputs), data)
    verbose = check_verbose(verbose, "qx.sensitivity()")
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no Dense/Conv layers to quantize.")
    if method not in METHODS:
        raise ValueError(f"unknown sensitivity method {method!r}; use one of {METHODS}.")
    if isinstance(candidates, int) or not candidates:
        raise ValueError(f"candidates must be a non-empty tuple of bit widths, got {candidates!r}.")
    candidates = tuple(sorted({check_bits(b, "candidate bits", WEIGHT_BITS) for b in candidates}))
    start = time.perf_counter()
    loss_fn = None
    if method == "sqnr":
        x = y = None
    else:
        if x is None:
            raise TypeError(f"method {method!r} needs samples and targets: qx.sensitivity(model, x, y); "
                            "only method=\"sqnr\" works without data.")
        from keras_qx._io import check_count, check_samples

        if max_samples is None:
            max_samples = 256 if method == "hessian" else 512
        max_samples = check_count(max_samples, "max_samples")
        check_count(batch_size, "batch_size")
        x = check_samples(x, model.input_shape[1:], "x")
        loss_fn, y = check_targets(model, x, y, loss)
        x, y = x[:max_samples], y[:max_samples]

    damage = {l.name: {} for l in layers}
    step = _progress(len(layers) * len(candidates), verbose)
    baseline = None
    if method == "loss":
        mean_loss = _loss_evaluator(model, loss_fn, x, y, batch_size)
        baseline = mean_loss()
    traces = _hessian_traces(model, layers, loss_fn, x, y, hessian_probes, seed) if method == "hessian" else None
    done = 0
    for layer in layers:
        kind = kernel_kind(layer)
        originals = [k.numpy() for k in _kernels(layer)]
        n = sum(w.size for w in originals)
        try:
            for bits in candidates:
                quantized = [fake_quantize(w, bits, kind.per_channel, kind.channel_axis,
                                           full_range=full_range_for(bits, kind.int2_export)) for w in originals]
                noise = sum(float(np.sum((q - w) ** 2)) for q, w in zip(quantized, originals))
                if method == "sqnr":
                    damage[layer.name][bits] = noise / max(sum(float(np.sum(w ** 2)) for w in originals), 1e-30)
                elif method == "hessian":
                    damage[layer.name][bits] = traces[layer.name] / n * noise
                else:
                    for var, q in zip(_kernels(layer), quantized):
                        var.assign(q)
                    damage[layer.name][bits] = mean_loss() - baseline
                done += 1
                step(done)
        finally:
            for var, w in zip(_kernels(layer), originals):
                var.assign(w)
    return SensitivityReport(
        method=method, candidates=candidates, damage=damage,
        kernel_bytes={l.name: {b: kernel_bytes(l, b) for b in candidates} for l in layers},
        params={l.name: kernel_params(l) for l in layers},
        types={l.name: type(l).__name__ for l in layers},
        seconds=time.perf_counter() - start, baseline_loss=baseline,
    )
