"""Layer-by-layer comparison of a QAT model with its TFLite file: where do they part?

``compare_layers`` runs the TFLite file with every intermediate tensor preserved (in a child
process, :func:`keras_qx._runtime.run_tensors`, so a runtime abort cannot end the caller), maps each
TFLite tensor to the Keras layer that produced it (by the layer names the converter keeps in
tensor names), and measures the difference in steps of that tensor's own quantization scale.
The first layer whose error exceeds ``threshold`` steps is where the simulation and the file
stop agreeing; later layers inherit its error.

Example:
    >>> from keras_qx.lite.fidelity import compare_layers                 # doctest: +SKIP
    >>> cmp = compare_layers(qat, bytes(tfl), x[:16])                 # doctest: +SKIP
    >>> cmp.first_divergent, print("\\n".join(cmp.lines()))          # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from keras_qx._compat import keras, tf
from keras_qx._deprecation import renamed_args
from keras_qx._graph import call_count, graph_nodes, inbound_layers, outbound_layers, output_in
from keras_qx._runtime import RuntimeCrash, run_tensors
from keras_qx.lite.inspect import read_model

__all__ = ["LayerError", "LayerComparison", "compare_layers", "debug_tflite"]

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
    # The layer's own error: the Keras layer (and the unmatched layers between it and the
    # matched ones before it) fed the TFLite tensors of its inputs instead of Keras' own.
    # Near zero where the simulation computes what the file computes; the plain error also
    # carries every upstream difference, which an untrained network amplifies.
    own_mean_steps: float | None = None
    own_max_steps: float | None = None


@dataclass
class LayerComparison:
    """Per-layer errors, in Keras topological order, and the first layer above the threshold."""

    layers: list
    threshold: float
    unmatched: list  # Keras layers with no TFLite tensor of their own (fused or value-preserving)
    mean_threshold: float = 0.1

    @property
    def first_own_divergent(self) -> str | None:
        """The first layer that departs from the file on its own: given the file's inputs, its
        max error exceeds ``threshold`` or its mean ``mean_threshold`` (a systematic difference,
        not an upstream one-step difference that the network amplified)."""
        return next((e.layer for e in self.layers if e.own_max_steps is not None
                     and (e.own_max_steps > self.threshold + 1e-3 or e.own_mean_steps > self.mean_threshold)), None)

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
        own = any(e.own_mean_steps is not None for e in self.layers)
        head = f"{'layer':40s} {'op':18s} {'mean':>7s} {'max':>7s}"
        out = [head + (f" {'own':>6s} {'max':>5s}" if own else "") + "  (steps of each tensor's scale)"]
        for e in self.layers:
            mark = " <" if e.layer == self.first_divergent else ""
            mark += " <own" if own and e.layer == self.first_own_divergent else ""
            extra = "".join(f" [{op} step {s:.3g}]" for op, s in e.intermediates)
            own_cols = "" if not own else (f" {'':6s} {'':5s}" if e.own_mean_steps is None
                                           else f" {e.own_mean_steps:6.2f} {e.own_max_steps:5.1f}")
            out.append(f"{e.layer[:40]:40s} {e.op[:18]:18s} {e.mean_steps:7.2f} {e.max_steps:7.1f}{own_cols}{mark}{extra}")
        return out

    def table(self) -> str:
        """One line per layer: op, mean and max error in steps (and its own error); ``<`` marks
        the first divergent layer."""
        return "\n".join(self.lines())

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"threshold": self.threshold, "mean_threshold": self.mean_threshold, "unmatched": list(self.unmatched),
                "first_divergent": self.first_divergent, "first_own_divergent": self.first_own_divergent,
                "layers": [asdict(e) for e in self.layers]}

    def plot(self, path=None, ax=None):
        """Mean and max error per layer (steps), in graph order: where the drift starts."""
        from keras_qx._plot import axes, finish

        fig, ax = axes(ax, figsize=(max(6, 0.45 * len(self.layers)), 3.5))
        names = [e.layer for e in self.layers]
        ax.bar(range(len(names)), [e.max_steps for e in self.layers], color="C1", alpha=0.5, label="max")
        ax.bar(range(len(names)), [e.mean_steps for e in self.layers], color="C0", label="mean")
        ax.axhline(self.threshold, linestyle="--", color="0.5", linewidth=1, label="threshold")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("error (steps of the tensor's scale)")
        ax.set_title("TFLite file vs QAT model, per layer")
        ax.legend(fontsize=8)
        finish(fig, path)
        return ax


def _layer_name(layer) -> str:
    name = layer.name
    return name[len(_QUANT_PREFIX):] if name.startswith(_QUANT_PREFIX) and hasattr(layer, "layer") else name


def _tensor_layers(tensor_name: str, known: dict) -> list:
    """Keras layer names (wrapper names, as in the graph) mentioned in a TFLite tensor name."""
    found = []
    nested = [n for n in known if "/" in n]  # layers inlined from custom layers: "quant_block/att_query"
    for part in tensor_name.split(";"):
        for piece in part.split("/"):
            if piece in known:
                found.append(piece)
        for name in nested:
            if f"/{name}/" in f"/{part}/":
                found.append(name)
    return found


def compare_layers(qat_model, tflite_model, x, threshold: float = 1.0, mean_threshold: float = 0.1,
                   own: bool = True) -> LayerComparison:
    """Compare every quantized intermediate tensor of ``tflite_model`` with the output of the
    Keras layer of ``qat_model`` that it stands for, on samples ``x``.

    Args:
        qat_model: the model from ``qx.quantize`` that was exported.
        tflite_model: the TFLite bytes (or a path) exported from it.
        x: float samples (n, *input_shape); each is run through the interpreter once.
        threshold, mean_threshold: max and mean error (in steps) above which a layer counts as
            divergent.
        own: also measure each layer's own error (``LayerError.own_mean_steps``): the Keras
            graph run once more with every matched layer's output replaced by its TFLite tensor,
            so that each layer computes from the file's values of its inputs.

    Returns:
        :class:`LayerComparison`: one :class:`LayerError` per Keras layer with a quantized TFLite
        tensor of its own (the last tensor the layer's ops produce; earlier ones, such as the MUL
        half of a BatchNorm, are listed as ``intermediates``), in the Keras layers' order.
    """
    data = read_model(tflite_model)
    x = np.asarray(x, dtype=np.float32)
    run = _run_file(data, x)
    details = run.tensors
    layers = [l for l in qat_model.layers if not isinstance(l, keras.layers.InputLayer)]
    order = {layer.name: i for i, layer in enumerate(qat_model.layers)}
    tensors = _quantized_tensors(qat_model, run, order)
    got = {t: run.values[t] for _, _, t, _ in tensors}
    chosen = _match_layers(qat_model, tensors, _keras_outputs(qat_model, layers, x), got, details, order)
    owner = _intermediates(tensors, chosen, run.ops, details, order)

    def final(t):
        while t in owner:
            t = owner[t]
        return t

    forced = _teacher_forced(qat_model, x, {chosen[final(t)][0]: t for t in chosen}, got, details) if own else {}
    per_layer = {}  # layer name -> [(op index, op name, tensor, is an intermediate)]
    for op_index, op_name, t, _ in tensors:
        if t in chosen:
            per_layer.setdefault(chosen[final(t)][0], []).append((op_index, op_name, t, t in owner))
    results = [_layer_error(qat_model, layer, per_layer[layer.name], chosen, owner, forced, got, details)
               for layer in layers if any(not e[3] for e in per_layer.get(layer.name, ()))]
    matched = {e.layer for e in results}
    unmatched = [_layer_name(l) for l in layers if _layer_name(l) not in matched]
    return LayerComparison(results, threshold, unmatched, mean_threshold)


# ---- the steps of compare_layers ----------------------------------------------------------
def _run_file(data: bytes, x: np.ndarray):
    """The file run on ``x`` with every tensor kept, in a child process like every runner: a
    runtime abort cannot end the caller."""
    try:
        return run_tensors(data, x)
    except RuntimeCrash as err:
        raise RuntimeCrash(f"debug_tflite could not run the file: {err}. A file the runtime aborts on cannot be "
                           "compared layer by layer: export it again with verification (qx.export_tflite(..., "
                           "verify=True) refuses it), or keep the layer that fails float by policy.") from None


def _quantized_tensors(qat_model, run, order: dict) -> list:
    """``[(op index, op name, tensor index, Keras layer names in the tensor's name)]``: every
    quantized (not int32) tensor an op produces whose values the run kept and whose name (or,
    for a model output, whose position) names a layer."""
    details = run.tensors
    outputs = {t: qat_model.outputs[i].node.layer.name
               for i, t in enumerate(run.outputs) if i < len(qat_model.outputs)}
    tensors = []
    for op in run.ops:
        for t in map(int, op["outputs"]):
            d = details.get(t)
            if d is None or d["dtype"] == "int32" or not d["quantization"][0] or t not in run.values:
                continue
            names = _tensor_layers(d["name"], order) + ([outputs[t]] if t in outputs else [])
            if names:
                tensors.append((op["index"], op["op_name"], t, names))
    return tensors


def _keras_outputs(qat_model, layers: list, x: np.ndarray) -> dict:
    """``{layer name: its output on x}`` for every layer of the QAT model."""
    probe = keras.Model(qat_model.inputs, [output_in(qat_model, l) for l in layers])
    ref = probe.predict(x, verbose=0, batch_size=64)
    return dict(zip([l.name for l in layers], ref if isinstance(ref, list) else [ref]))


def _dequantized(got: dict, details: dict, t: int) -> np.ndarray:
    scale, zero = details[t]["quantization"]
    return (np.stack(got[t]).astype(np.float32) - zero) * scale


def _steps(keras_out, got: dict, details: dict, t: int):
    """|file - Keras| per value of tensor ``t``, in steps of its scale (None if the sizes differ)."""
    tfl, keras_out = _dequantized(got, details, t), np.asarray(keras_out)
    if keras_out.size != tfl.size:
        return None
    return np.abs(tfl.reshape(-1) - keras_out.reshape(-1)) / details[t]["quantization"][0]


def _chain(qat_model, name: str, steps: int = 4) -> list:
    """The layer and its single-consumer successors: a fused op's name often lists only the
    first TF op (conv) though its result is the last one's (BN, ReLU)."""
    out, layer = [name], qat_model.get_layer(name)
    for _ in range(steps):
        nxt = {l.name for l in outbound_layers(layer)}
        if len(nxt) != 1:
            break
        layer = qat_model.get_layer(nxt.pop())
        if call_count(layer) != 1 or len(inbound_layers(layer)) != 1:
            break
        out.append(layer.name)
    return out


def _match_layers(qat_model, tensors: list, ref: dict, got: dict, details: dict, order: dict) -> dict:
    """``{tensor: (layer name, errors in steps)}``: each tensor goes to the layer, among the last
    one its name mentions and that layer's single-consumer chain, whose output it is closest to."""
    chosen = {}
    for _, _, t, names in tensors:
        best = None
        for cand in _chain(qat_model, max(names, key=order.get)):
            err = _steps(ref[cand], got, details, t)
            if err is not None and (best is None or err.mean() < best[1].mean() - 1e-9):
                best = (cand, err)
        if best is not None:
            chosen[t] = best
    return chosen


def _intermediates(tensors: list, chosen: dict, ops: list, details: dict, order: dict) -> dict:
    """``{tensor: the tensor of its layer's result}`` for each intermediate: a tensor whose only
    consumer finishes the same layer's computation at another scale (the MUL half of a BatchNorm
    before its ADD)."""
    consumers = {}
    for op in ops:
        for t in op["inputs"]:
            consumers.setdefault(int(t), []).append(op)
    owner = {}
    for _, _, t, names in tensors:
        users = consumers.get(t, []) if t in chosen else []
        if len(users) != 1:
            continue
        u = [int(o) for o in users[0]["outputs"] if int(o) in chosen]
        if u and details[u[0]]["quantization"][0] != details[t]["quantization"][0] and (
                set(names) & set(_tensor_layers(details[u[0]]["name"], order)) or chosen[t][0] == chosen[u[0]][0]):
            owner[t] = u[0]
    return owner


def _layer_error(qat_model, layer, entries: list, chosen: dict, owner: dict, forced: dict, got: dict,
                 details: dict) -> LayerError:
    """One layer's :class:`LayerError`: its result tensor is the last op's that is not an
    intermediate; ``entries`` as ``(op index, op name, tensor, is an intermediate)``."""
    op_index, op_name, t, _ = max(e for e in entries if not e[3])
    err = chosen[t][1]
    d = details[t]
    inter = [(f"{name}:{_layer_name(qat_model.get_layer(chosen[i][0]))}" if i in owner else name,
              float(details[i]["quantization"][0])) for _, name, i, _ in sorted(entries) if i != t]
    own_err = _steps(forced[layer.name], got, details, t) if layer.name in forced else None
    return LayerError(_layer_name(layer), op_name, d["name"], float(d["quantization"][0]),
                      float(err.mean()), float(err.max()), inter,
                      None if own_err is None else float(own_err.mean()),
                      None if own_err is None else float(own_err.max()))


def _teacher_forced(qat_model, x, forced_tensors: dict, got: dict, details: dict) -> dict:
    """Run ``qat_model``'s graph on ``x`` (inference), replacing the output of each layer in
    ``forced_tensors`` ({layer name: TFLite tensor}) by that tensor's dequantized TFLite values;
    return every layer's output computed that way ({layer name: array}), i.e. each layer's
    result given the file's values of the matched layers before it."""
    replace = {name: _dequantized(got, details, t) for name, t in forced_tensors.items()}
    nodes_by_depth, usage = graph_nodes(qat_model)
    values = {str(id(i)): tf.convert_to_tensor(v) for i, v in zip(qat_model.inputs, [x])}
    computed = {}
    for nodes in nodes_by_depth:
        for node in nodes:
            if node.is_input or any(i not in values for i in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments({k: [v] * max(1, usage.get(k, 1)) for k, v in values.items()})
            kwargs = {k: v for k, v in kwargs.items() if k != "training"}
            out = node.layer(*args, training=False, **kwargs) if _takes_training(node.layer) else node.layer(*args, **kwargs)
            flat = tf.nest.flatten(out)
            name = node.layer.name
            if len(flat) == 1:
                computed[name] = np.asarray(flat[0])
                if name in replace and replace[name].size == computed[name].size:
                    flat = [tf.convert_to_tensor(replace[name].reshape(computed[name].shape))]
            for x_id, y in zip(node.flat_output_ids, flat):
                values[x_id] = y
    return computed


def _takes_training(layer) -> bool:
    return getattr(layer, "_expects_training_arg", False)


@renamed_args(tflite_model="tflite")
def debug_tflite(qat_model, tflite, x, threshold: float = 1.0, mean_threshold: float = 0.1,
                 own: bool = True) -> LayerComparison:
    """Where a file drifts from its QAT model, layer by layer (``compare_layers`` is its old name).

    Args:
        qat_model: the model from ``qx.quantize`` that was exported.
        tflite: the file: a path, its bytes, or what ``qx.export_tflite`` returned.
        x: float samples (n, *input_shape); each is run through the interpreter once.
        threshold, mean_threshold, own: as in :func:`compare_layers`.

    Returns:
        :class:`LayerComparison`, one :class:`LayerError` per Keras layer with a quantized tensor.

    Example:
        >>> print(qx.debug_tflite(qat, "model.tflite", x_test[:32]).table())   # doctest: +SKIP
    """
    return compare_layers(qat_model, tflite, x, threshold, mean_threshold, own)
