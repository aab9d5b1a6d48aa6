"""``qx.summary``: a per-layer table of bits, parameters and exported bytes.

Example:
    >>> qx.summary(qat_model)     # doctest: +SKIP
"""
from __future__ import annotations

from keras_qx._compat import keras, quantize_wrapper
from keras_qx._graph import check_model
from keras_qx.compress.cluster import kernel_distinct
from keras_qx.compress.prune import kernel_sparsity
from keras_qx.qat.quantize import resolve
from keras_qx.quant.cost import GzipPrediction, LayerCost, layer_cost, predict_gzip
from keras_qx.rewrite.flatten import flatten_nested
from keras_qx.rewrite.keras3 import as_tf_keras

__all__ = ["summary", "layer_costs", "predict_gzip_bytes", "float_layers_stored_integer"]


def predict_gzip_bytes(model, policy=None) -> GzipPrediction:
    """Predicted gzip -9 bytes of the TFLite file ``qx.export_tflite`` would write for the float
    ``model`` quantized with ``policy`` (anything ``qx.quantize`` takes), from the model's weights
    with numpy alone (no quantization, no conversion): ``.total``, ``.kernels`` (and by layer in
    ``.layers``), ``.biases`` and ``.graph``. Measured within a few % of real files
    (bench/results/gzip_cost.md).

    Example:
        >>> qx.predict_gzip_bytes(model, qx.Policy.uniform(4)).total      # doctest: +SKIP
        31250
    """
    model = as_tf_keras(model)
    specs = resolve(model, policy)
    bits = {name: (spec.weight_bits if spec.quantize else None) for name, spec in specs.items()}
    return predict_gzip(flatten_nested(model, copies=False).layers, bits)


def layer_costs(qat_model) -> list[tuple[LayerCost, int | None]]:
    """``[(LayerCost, activation_bits)]`` for each layer with parameters or quantized output."""
    rows = []
    for layer in qat_model.layers:
        if isinstance(layer, quantize_wrapper.QuantizeWrapper):
            inner, config = layer.layer, layer.quantize_config
            w_bits = getattr(config, "weight_bits", None)
            if w_bits is None and config.get_weights_and_quantizers(inner):
                w_bits = 8  # a foreign (tfmot) config with weights: 8-bit
            a_bits = getattr(config, "activation_bits", None)
            if a_bits is None and (config.get_output_quantizers(inner) or config.get_activations_and_quantizers(inner)):
                a_bits = 8
            attrs = getattr(config, "weight_attrs", None) or []
            kernels = [v for v, _, _ in getattr(layer, "_weight_vars", [])]
            packed = getattr(getattr(config, "weight_quantizer", None), "pack", True)
            cost = layer_cost(inner, w_bits, dict(zip(attrs, kernels)) if len(attrs) == len(kernels) else None, packed)
        elif isinstance(layer, keras.layers.InputLayer) or not layer.weights:
            continue
        else:  # kept float
            cost, a_bits = layer_cost(layer, None), None
            if cost.params == 0:
                cost = None
        if cost is not None and (cost.params or a_bits):
            rows.append((cost, a_bits))
    return rows


def float_layers_stored_integer(qat_model, info) -> dict[str, str]:
    """``{layer: storage type}`` of the layers ``qat_model`` trains with float kernels (the policy's
    ``quantize: false``) whose kernel the TFLite file (``info``: ``qx.inspect_tflite`` of it, or
    an export's ``report.info``) stores as an integer type anyway.

    The converter does that to a float layer between quantized ones (measured, TF 2.21: Dense ->
    Dense(quantize: false) -> Dense gives three int8 FULLY_CONNECTED, with or without
    representative data): tfmot quantizes the float layer's output for the next layer, so the op
    has int8 edges, and the converter then quantizes its weights itself (its own scale, not
    trained). Layers kept float by keras_qx (recurrent: no integer kernel) stay float and are not
    listed."""
    from keras_qx.quant.kinds import kernel_kind

    found = {}
    stored = [(name, kind) for name, kind, shape, *_ in info.weights if len(shape) >= 2 and kind != "INT32"]
    for layer in qat_model.layers:
        inner = getattr(layer, "layer", layer)
        config = getattr(layer, "quantize_config", None)
        if kernel_kind(inner) is None or isinstance(inner, keras.Model):
            continue
        if config is not None and (getattr(config, "weight_bits", None) is not None
                                   or config.get_weights_and_quantizers(inner)):
            continue  # its kernel is quantized in training
        if type(config).__name__ == "KeptFloatQuantizeConfig":
            continue
        kinds = {kind for name, kind in stored if f"/{layer.name}/" in f"/{name}" or f"/{inner.name}/" in f"/{name}"}
        integer = sorted(k for k in kinds if k not in ("FLOAT32", "FLOAT16"))
        if integer:
            found[inner.name] = integer[0]
    return found


def _fmt_bits(bits):
    return "-" if bits is None else str(bits)


def _fmt_distinct(found):
    if found is None:
        return "-"
    total, channel = found
    return f"{channel}/ch" if channel is not None else f"{total:,}"


def summary(qat_model, print_fn=print, tflite=None) -> str:
    """Print (and return) the table: layer, type, weight bits, activation bits, sparsity,
    distinct values, params, bytes.

    Sparsity is the fraction of a layer's kernel values that are zero as the model computes
    with them: after quantization for a QAT model (what the file stores, rounding's zeros
    included), after the mask for a pruned one. Values is how many distinct values the kernel
    holds, likewise (after quantization; ``7/ch``: at most 7 in one output channel, for a kernel
    quantized per channel, whose channels have scales of their own in the file).

    Bytes follow the shared cost model (:mod:`keras_qx.quant.cost`): packed INT2 / INT4 where
    the exporter packs, int8 otherwise, int32 biases, float32 for float layers; "Gzip kernel" is
    the kernel's predicted gzip'd bytes (``size="gzip"``).

    ``tflite``: the exported file (``qx.export_tflite``'s result, or ``qx.inspect_tflite`` of
    the file): a layer the policy keeps float whose kernel the file stores as
    an integer anyway (the converter quantizes a float layer between quantized ones) shows the
    file's type, e.g. ``float (file: INT8)``, with a note (:func:`float_layers_stored_integer`).
    """
    check_model(qat_model, "qat_model")
    rows = layer_costs(qat_model)
    in_file = {}
    if tflite is not None:  # (qat/ may not import lite/: a file's bytes are read by qx.inspect_tflite)
        info = getattr(getattr(tflite, "report", None), "info", None) or (tflite if hasattr(tflite, "weights") else None)
        if info is None:
            raise TypeError(f"summary(tflite=...) takes qx.export_tflite's result or qx.inspect_tflite(file), got "
                            f"{type(tflite).__name__}; for a file's bytes or path pass qx.inspect_tflite(it).")
        in_file = float_layers_stored_integer(qat_model, info)
    sparsity = kernel_sparsity(qat_model)
    distinct = kernel_distinct(qat_model)
    header = ("Layer", "Type", "W bits", "A bits", "Sparsity", "Values", "Params", "Bytes", "Gzip kernel")
    table = [(c.name, c.type, f"float (file: {in_file[c.name]})" if c.name in in_file
              else _fmt_bits(c.weight_bits) if c.params else "-", _fmt_bits(a),
              f"{sparsity[c.name]:.1%}" if c.name in sparsity else "-", _fmt_distinct(distinct.get(c.name)),
              f"{c.params:,}", f"{c.bytes:,}", f"~{c.gzip_bytes:,}" if c.kernel_bytes else "-")
             for c, a in rows]
    params = sum(c.params for c, _ in rows)
    total = sum(c.bytes for c, _ in rows)
    float_total = sum(c.float_bytes for c, _ in rows)
    widths = [max(len(str(r[i])) for r in [header] + table) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w if i < 2 else "{:>%d}" % w for i, w in enumerate(widths))
    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = [f'Model: "{qat_model.name}"', sep, line.format(*header), sep]
    out += [line.format(*r) for r in table]
    ratio = float_total / total if total else float("nan")
    out += [sep, f"Total params: {params:,}",
            f"Quantized size: {total:,} bytes (float32: {float_total:,} bytes, {ratio:.2f}x smaller)",
            f"Predicted gzip'd kernels: {sum(c.gzip_bytes or 0 for c, _ in rows):,} bytes (stored: "
            f"{sum(c.kernel_bytes for c, _ in rows):,}; whole file: qx.predict_gzip_bytes)", sep]
    if in_file:
        out += [f"Kept float by the policy but integer in the file: {', '.join(sorted(in_file))} (the converter "
                "quantizes a float layer between quantized ones with weight scales of its own; Bytes counts it "
                "float32). Quantize it, so that QAT trains the scales the file uses, or for a float32 op convert the "
                "float model with qx.ptq(..., keep_float=[...]).", sep]
    text = "\n".join(out)
    if print_fn is not None:
        for row in out:
            print_fn(row)
    return text
