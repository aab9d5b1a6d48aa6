"""Layer-by-layer comparison of a QAT model with its TFLite file: where do they part?

``compare_layers`` runs the TFLite file with every intermediate tensor preserved, maps each
TFLite tensor to the Keras layer that produced it (by the layer names the converter keeps in
tensor names), and measures the difference in steps of that tensor's own quantization scale.
The first layer whose error exceeds ``threshold`` steps is where the simulation and the file
stop agreeing; later layers inherit its error.

Example:
    >>> from keras_qx.fidelity import compare_layers                 # doctest: +SKIP
    >>> cmp = compare_layers(qat, bytes(tfl), x[:16])                 # doctest: +SKIP
    >>> cmp.first_divergent, print("\\n".join(cmp.lines()))          # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from keras_qx._compat import keras
from keras_qx.tflite import read_model

__all__ = ["LayerError", "LayerComparison", "compare_layers"]

_QUANT_PREFIX = "quant_"  # tfmot's QuantizeWrapper name: quant_<layer name>


@dataclass
class LayerError:
    """One Keras layer output against the TFLite tensor that holds it."""

    layer: str  # Keras layer name (without tfmot's ``quant_`` prefix)
    op: str  # the TFLite op producing the tensor
    tensor: str  # TFLite tensor name
    scale: float  # the TFLite tensor's quantization step
    mean_steps: float
    max_steps: float
    intermediates: list = field(default_factory=list)  # (op, scale) of earlier tensors of the same layer


@dataclass
class LayerComparison:
    """Per-layer errors, in Keras topological order, and the first layer above the threshold."""

    layers: list
    threshold: float
    unmatched: list  # Keras layers with no TFLite tensor of their own (fused or value-preserving)
    mean_threshold: float = 0.1

    @property
    def first_divergent(self) -> str | None:
        """The first layer whose max error exceeds ``threshold`` steps or whose mean error exceeds
        ``mean_threshold`` steps (a rounding the simulation lacks shows as a mean of 0.2-0.5
        steps with a max of 1; tie-breaking differences stay near 0 on average)."""
        return next((e.layer for e in self.layers if e.max_steps > self.threshold + 1e-3
                     or e.mean_steps > self.mean_threshold), None)

    def __getitem__(self, name: str) -> LayerError:
        for e in self.layers:
            if e.layer == name:
                return e
        raise KeyError(name)

    def lines(self) -> list[str]:
        out = [f"{'layer':40s} {'op':18s} {'mean':>7s} {'max':>7s}  (steps of each tensor's scale)"]
        for e in self.layers:
            mark = " <" if e.layer == self.first_divergent else ""
            extra = "".join(f" [{op} step {s:.3g}]" for op, s in e.intermediates)
            out.append(f"{e.layer[:40]:40s} {e.op[:18]:18s} {e.mean_steps:7.2f} {e.max_steps:7.1f}{mark}{extra}")
        return out


def _layer_name(layer) -> str:
    name = layer.name
    return name[len(_QUANT_PREFIX):] if name.startswith(_QUANT_PREFIX) and hasattr(layer, "layer") else name


def _tensor_layers(tensor_name: str, known: dict) -> list:
    """Keras layer names (wrapper names, as in the graph) mentioned in a TFLite tensor name."""
    found = []
    for part in tensor_name.split(";"):
        for piece in part.split("/"):
            if piece in known:
                found.append(piece)
    return found


def _interpreter(model_bytes):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=model_bytes, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    return interpreter


def _quantize_input(x, detail):
    scale, zero = detail["quantization"]
    if detail["dtype"] == np.float32 or not scale:
        return x.astype(detail["dtype"])
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])


def compare_layers(qat_model, tflite_model, x, threshold: float = 1.0, mean_threshold: float = 0.1) -> LayerComparison:
    """Compare every quantized intermediate tensor of ``tflite_model`` with the output of the
    Keras layer of ``qat_model`` that it stands for, on samples ``x``.

    Args:
        qat_model: the model from ``qx.quantize`` that was exported.
        tflite_model: the TFLite bytes (or a path) exported from it.
        x: float samples (n, *input_shape); each is run through the interpreter once.
        threshold, mean_threshold: max and mean error (in steps) above which a layer counts as
            divergent.

    Returns:
        :class:`LayerComparison`: one :class:`LayerError` per Keras layer with a quantized TFLite
        tensor of its own (the last tensor the layer's ops produce; earlier ones, such as the MUL
        half of a BatchNorm, are listed as ``intermediates``), in the Keras layers' order.
    """
    data = read_model(tflite_model)
    interpreter = _interpreter(data)
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    order = {layer.name: i for i, layer in enumerate(qat_model.layers)}
    # Each op output tensor -> the latest Keras layer named in it (a fused op is named after all
    # the TF ops folded into it; its result is that of the last one).
    produced = {}  # keras layer name -> [(op index, op name, tensor index)]
    fused = set()  # layers whose result is computed inside an op named after a later layer
    outputs = {int(d["index"]): qat_model.outputs[i].node.layer.name if hasattr(qat_model.outputs[i], "node")
               else None for i, d in enumerate(interpreter.get_output_details())}
    for op in interpreter._get_ops_details():  # pylint: disable=protected-access
        for t in op["outputs"]:
            d = details.get(int(t))
            if d is None or d["dtype"] == np.int32 or not d["quantization"][0]:
                continue
            names = _tensor_layers(d["name"], order)
            if outputs.get(int(t)):  # graph outputs are named after the signature, not the layer
                names.append(outputs[int(t)])
            if names:
                layer = max(names, key=order.get)
                fused.update(n for n in names if n != layer)
                produced.setdefault(layer, []).append((op["index"], op["op_name"], int(t)))
    # A fused layer's own tensors are intermediates of the op that finishes its computation
    # (a BatchNorm's MUL before the ADD fused with the next ReLU): list them under that layer.
    for name in sorted(fused & set(produced), key=order.get, reverse=True):
        later = [n for n in produced if order[n] > order[name] and any(
            name in _tensor_layers(details[t]["name"], order) for _, _, t in produced[n])]
        if later:
            produced[min(later, key=order.get)].extend((-1, f"{op}:{name[len(_QUANT_PREFIX):] if name.startswith(_QUANT_PREFIX) else name}", t) for _, op, t in produced.pop(name))

    x = np.asarray(x, dtype=np.float32)
    layers = [l for l in qat_model.layers if any(e[0] >= 0 for e in produced.get(l.name, ()))]
    probe = keras.Model(qat_model.inputs, [l.output for l in layers])
    ref = probe.predict(x, verbose=0, batch_size=64)
    ref = ref if isinstance(ref, list) else [ref]
    inp = interpreter.get_input_details()[0]
    chosen = {l.name: max(e for e in produced[l.name] if e[0] >= 0)[2] for l in layers}
    got = {t: [] for t in chosen.values()}
    for sample in x:
        interpreter.set_tensor(inp["index"], _quantize_input(sample[None], inp))
        interpreter.invoke()
        for t in got:
            got[t].append(interpreter.get_tensor(t)[0])

    results, unmatched = [], [_layer_name(l) for l in qat_model.layers
                              if l.name not in produced and not isinstance(l, keras.layers.InputLayer)]
    for layer, keras_out in zip(layers, ref):
        own = sorted(e for e in produced[layer.name] if e[0] >= 0)
        op_index, op_name, t = own[-1]
        entries = sorted(e for e in produced[layer.name] if e[2] != t)
        d = details[t]
        scale, zero = d["quantization"]
        tfl = (np.stack(got[t]).astype(np.float32) - zero) * scale
        keras_out = np.asarray(keras_out)
        if keras_out.size != tfl.size:
            unmatched.append(_layer_name(layer))
            continue
        err = np.abs(tfl.reshape(-1) - keras_out.reshape(-1)) / scale
        inter = [(name, float(details[i]["quantization"][0])) for _, name, i in entries]
        results.append(LayerError(_layer_name(layer), op_name, d["name"], float(scale), float(err.mean()),
                                  float(err.max()), inter))
    return LayerComparison(results, threshold, unmatched, mean_threshold)
