"""``qx.quantize``: a float tf_keras model -> a mixed-precision QAT model via tfmot.

Example:
    >>> import keras_qx as qx
    >>> from keras_qx.data import digits_cnn
    >>> qat = qx.quantize(digits_cnn(), {"rules": [{"type": "Dense", "weight_bits": 4}]})
"""
from __future__ import annotations

import dataclasses
import gc
import warnings
from typing import Any

from keras_qx._compat import keras, quantize_annotate, quantize_apply_in_place, tf, tfmot
from keras_qx._graph import check_float_model, check_model
from keras_qx.qat.annotate import annotation_fields
from keras_qx.quant.kinds import FLOAT, REFUSED, kernel_kind, treatment
from keras_qx.rewrite.flatten import ATTENTION_PARTS, LAYER_NORM_PARTS, flatten_nested
from keras_qx.rewrite.inline import is_custom_layer
from keras_qx.quant.quantizers import ClusterWeightQuantizer, SparseWeightQuantizer, WeightQuantizer
from keras_qx.quant.configs import KernelQuantizeConfig
from keras_qx.compress.cluster import check_not_clustered, cluster_table, init_cluster_tables
from keras_qx.compress.prune import check_not_pruned
from keras_qx.rewrite.keras3 import as_tf_keras
from keras_qx.quant.policy import LayerSpec, Policy, PolicyError
from keras_qx.qat.registry import PolicyQuantizeRegistry, PolicyQuantizeScheme
from keras_qx.qat.saving import quantize_scope, refresh_normalization

__all__ = ["quantize", "resolve", "unexportable_layers", "EXPORTABLE_ACTIVATION_BITS"]

EXPORTABLE_ACTIVATION_BITS = (8,)


def _inner(layer):
    return layer.layer if isinstance(layer, quantize_annotate.QuantizeAnnotate) else layer


def _foreign(layer) -> bool:
    """Annotated by the user with a QuantizeConfig that is not keras_qx's."""
    return layer is not _inner(layer) and not hasattr(layer.quantize_config, "pinned")


def _annotation(layer):
    inner = _inner(layer)
    return annotation_fields(layer.quantize_config) if inner is not layer else None


def _flatten(model, policy: Policy):
    """``(flatten_nested(model), policy)``, leaving whole the layers the policy keeps float (a
    masked MultiHeadAttention, say); a policy entry naming a decomposed MultiHeadAttention
    or an inlined custom layer applies to each of its parts (more specific entries win)."""
    keep = {_inner(l).name for l in model.layers if not isinstance(_inner(l), keras.Model)
            and not isinstance(l, keras.layers.InputLayer)
            and not policy.spec_for(_inner(l), _annotation(l)).quantize}
    flat = flatten_nested(model, keep)
    _refuse(flat)  # after inlining: a Lambda of TF ops is inlined, one that cannot be is refused
    present = {l.name for l in flat.layers}

    def parts(name):  # a decomposed MultiHeadAttention's parts, an inlined custom layer's layers
        return [p for p in present if p.startswith(f"{name}/")
                or any(p == f"{name}_{part}" for part in ATTENTION_PARTS + LAYER_NORM_PARTS)]

    split = [name for name in policy.layers if name not in present and name not in keep and parts(name)]
    if split:
        data = policy.to_dict()
        for name in sorted(split, key=len, reverse=True):  # the most specific entry first: it wins
            entry = data["layers"].pop(name)
            for part in sorted(parts(name)):
                data["layers"].setdefault(part, dict(entry))
        policy = Policy.from_dict(data)
    return flat, policy


def _kept_float(layer) -> str | None:
    """Why ``layer`` stays float whatever the policy says (TREATMENTS: FLOAT), else None."""
    known = treatment(layer)
    return known.reason if known is not None and known.kind == FLOAT else None


def _refuse(model) -> None:
    """PolicyError naming the layers no int8 TFLite model can hold (TREATMENTS: REFUSED) and why."""
    refused = {}
    for layer in model.layers:
        known = treatment(_inner(layer))
        if known is not None and known.kind == REFUSED:
            refused.setdefault(known.reason, []).append(f"{_inner(layer).name} ({type(_inner(layer)).__name__})")
    if refused:
        raise PolicyError("keras_qx cannot quantize " + "; ".join(
            f"{names}: {reason}" for reason, names in refused.items()) + ".")


def resolve(model, policy: Any = None) -> dict[str, LayerSpec]:
    """``{layer_name: LayerSpec}`` for every non-input layer: policy + annotations merged
    (nested models are inlined first, as ``quantize`` does; a Keras 3 model is rebuilt first)."""
    model = as_tf_keras(model)
    check_model(model)
    return _specs(*_flatten(model, Policy.coerce(policy)))


def _specs(flat, policy: Policy) -> dict[str, LayerSpec]:
    """``resolve`` on a model already flattened, with the policy ``_flatten`` returned."""
    layers = [l for l in flat.layers if not isinstance(l, keras.layers.InputLayer)]
    policy.check_against([_inner(l) for l in layers])
    return {_inner(l).name: policy.spec_for(_inner(l), _annotation(l)) for l in layers}


def quantize(model, policy: Any = None, *, simulate_only: bool = False, preserve_sparsity: bool = False,
             preserve_clusters: bool = False):
    """Return a QAT copy of ``model`` with per-layer bits from ``policy`` and ``qx.annotate``.

    Args:
        model: a built tf_keras Sequential or Functional model (weights are copied), or a Keras 3
            one of standard layers, rebuilt as tf_keras first (``keras_qx.rewrite.keras3``).
        policy: a :class:`Policy`, its dict or JSON; None means uniform 8-bit.
        simulate_only: allow settings the TFLite exporter cannot deliver (activations other
            than 8 bits, int8-only layers below 8 bits); the model then trains but
            ``export_tflite`` refuses it, also after saving, loading or cloning (the settings
            live in each layer's quantize config: see :func:`unexportable_layers`).
        preserve_sparsity: keep every zero of every kernel a zero through QAT and in the file
            (a pruned model, after ``qx.strip_pruning``): each weight quantizer multiplies its
            kernel by a fixed mask of the kernel's nonzeros (:class:`SparseWeightQuantizer`).
        preserve_clusters: keep every clustered kernel (a model from ``qx.cluster``, after
            ``qx.strip_clustering``) to its distinct values through QAT and in the file: a
            kernel with fewer distinct values than values, and at most the grid's ``2**bits - 1``
            (per tensor, else per output channel), trains as a table of centroids and a fixed
            index map (:class:`ClusterWeightQuantizer`); rounding can merge values, never split
            them. With ``preserve_sparsity`` too, a centroid at exactly 0 stays 0.

    Raises:
        PolicyError: bad policy, or a setting that cannot be exported without ``simulate_only``.
        TypeError/ValueError: a subclassed (Keras 2 or 3), unbuilt or already quantized model, or a
            Keras 3 layer that cannot be rebuilt as tf_keras (named).
    """
    policy = Policy.coerce(policy)
    model = as_tf_keras(model)
    for name, flag in (("preserve_sparsity", preserve_sparsity), ("preserve_clusters", preserve_clusters)):
        if not isinstance(flag, bool):
            raise TypeError(f"quantize({name}=...) must be True or False, got {flag!r}.")
    check_not_pruned(model)
    check_not_clustered(model)
    check_float_model(model)
    model, policy = _flatten(model, policy)
    specs = _specs(model, policy)
    if not simulate_only:
        _check_exportable_activations(specs)
    _warn_float_layers(model, specs)
    specs = _keep_custom_layers_float(model, specs)
    if not simulate_only:
        specs = _clamp_to_exportable(model, specs)
    registry = _registry(model, specs, policy, preserve_sparsity, preserve_clusters)
    _check_supported(model, specs, registry)
    qat = _apply(model, _annotated(model, specs), registry)
    del model
    gc.collect()  # the models built on the way are cyclic garbage holding weights: free them now
    return qat


# ---- the steps of quantize -------------------------------------------------------------------
def _check_exportable_activations(specs: dict) -> None:
    unexportable = {n: s.activation_bits for n, s in specs.items()
                    if s.quantize and s.activation_bits not in EXPORTABLE_ACTIVATION_BITS}
    if unexportable:
        raise PolicyError(
            f"activation bits {unexportable} cannot be exported: TFLite integer kernels take "
            "8-bit activations (int16 activations are a post-training mode: qx.ptq(model, "
            "'int16x8')). Use activation_bits=8, or pass simulate_only=True to train the "
            "simulation anyway."
        )


def _warn_float_layers(model, specs: dict) -> None:
    """Warn (at quantize's caller) about the quantized layers the file will run in float: ops the
    converter keeps float, and layers keras_qx keeps float with their outputs quantized."""
    float_ops, by_reason = {}, {}
    for l in model.layers:
        spec, inner = specs.get(_inner(l).name), _inner(l)
        if spec is None or not spec.quantize or _foreign(l):
            continue
        label = f"{inner.name} ({type(inner).__name__})"
        known = treatment(inner)
        if known is not None and known.float_op:
            float_ops.setdefault(known.reason, []).append(label)
        if _kept_float(inner):
            by_reason.setdefault(_kept_float(inner), []).append(label)
    if float_ops:
        warnings.warn("keras_qx: the TFLite file will run these layers in float (their neighbours stay integer): "
                      + "; ".join(f"{names}: {reason}" for reason, names in float_ops.items()) + ".", stacklevel=3)
    if by_reason:
        warnings.warn("keras_qx keeps these layers float, their outputs quantized (the rest of the model is "
                      "quantized; the TFLite file runs them in float32): "
                      + "; ".join(f"{names}: {reason}" for reason, names in by_reason.items()) + ".", stacklevel=3)


def _keep_custom_layers_float(model, specs: dict) -> dict:
    """Custom layers ``flatten_nested`` did not inline (it warned why) stay float, their
    neighbours quantized."""
    specs = dict(specs)
    for l in model.layers:
        inner = _inner(l)
        if is_custom_layer(inner) and not _foreign(l) and specs.get(inner.name, LayerSpec(quantize=False)).quantize:
            specs[inner.name] = dataclasses.replace(specs[inner.name], quantize=False)
    return specs


def _registry(model, specs: dict, policy: Policy, preserve_sparsity: bool, preserve_clusters: bool):
    """The quantize registry of ``specs``: the policy's, or one preserving zeros and clusters."""
    default = LayerSpec().updated(policy.default, "default")
    if not (preserve_sparsity or preserve_clusters):
        return PolicyQuantizeRegistry(specs, default=default)
    registry = _PreservingRegistry(specs, default=default)
    registry.preserve_sparsity = preserve_sparsity
    registry.tables = _cluster_tables(model, specs) if preserve_clusters else {}
    return registry


def _check_supported(model, specs: dict, registry) -> None:
    unsupported = [f"{_inner(l).name} ({type(_inner(l)).__name__})" for l in model.layers
                   if _inner(l).name in specs and specs[_inner(l).name].quantize
                   and not _foreign(l) and not registry.supports(_inner(l))]
    if unsupported:
        raise PolicyError(
            f"keras_qx has no quantize config for layer(s) {unsupported}. Keep them float with "
            "policy layers {name: {'quantize': false}}, or annotate them with a tfmot QuantizeConfig."
        )


def _annotated(model, specs: dict):
    """A copy of ``model`` with each layer to quantize in a tfmot ``QuantizeAnnotate``; the
    layers kept float bare, the user's own tfmot annotations as they are."""

    def wrap(layer):
        inner = _inner(layer)
        spec = specs.get(inner.name)
        if spec is None:  # input layers
            return layer
        if _foreign(layer):
            return layer  # the user's own tfmot QuantizeConfig: leave it in charge
        if not spec.quantize:
            return inner
        return quantize_annotate.QuantizeAnnotate(inner)

    annotated = keras.models.clone_model(model, clone_function=wrap)
    if not any(isinstance(l, quantize_annotate.QuantizeAnnotate) for l in annotated.layers):
        raise PolicyError("the policy keeps every layer float (quantize: false); nothing to quantize. Set "
                          "quantize: true on the layers to quantize, or convert the float model with qx.ptq.")
    return annotated


def _apply(model, annotated, registry):
    """tfmot's ``quantize_apply`` with the policy's scheme, then the QAT model's starting state
    (cluster tables, normalization statistics, weight ranges, sparsity masks)."""
    # tfmot rebuilds the model from its config: make the model's own layer classes resolvable
    # (custom layers need no registration).
    own_classes = {type(_inner(l)).__name__: type(_inner(l)) for l in model.layers}
    with quantize_scope(own_classes), quantize_apply_in_place(annotated):
        qat = tfmot.quantization.keras.quantize_apply(annotated, PolicyQuantizeScheme(registry))
    init_cluster_tables(qat)
    refresh_normalization(qat)
    _init_weight_ranges(qat)
    _init_sparsity_masks(qat)
    return qat


class _PreservingRegistry(PolicyQuantizeRegistry):
    """The policy's registry with each kernel quantizer a :class:`ClusterWeightQuantizer` (the
    layers of ``tables``) or a :class:`SparseWeightQuantizer` (``preserve_sparsity``)."""

    preserve_sparsity = False
    tables: dict = {}

    def config_for(self, name, *args, **kwargs):
        config = super().config_for(name, *args, **kwargs)
        if isinstance(config, KernelQuantizeConfig) and type(config.weight_quantizer) is WeightQuantizer:
            q = config.weight_quantizer
            table = self.tables.get(name)
            if table is not None:
                config.weight_quantizer = ClusterWeightQuantizer(q.bits, q.per_channel, q.channel_axis, *table,
                                                                 preserve_sparsity=self.preserve_sparsity,
                                                                 full_range=q.full_range, pack=q.pack)
            elif self.preserve_sparsity:
                config.weight_quantizer = SparseWeightQuantizer(q.bits, q.per_channel, q.channel_axis, q.full_range,
                                                                q.pack)
        return config


def _cluster_tables(model, specs) -> dict:
    """``{layer name: (clusters, cluster_axis)}`` of the quantized layers whose kernels train as
    centroid tables (:func:`~keras_qx.compress.cluster.cluster_table`)."""
    tables = {}
    for layer in model.layers:
        inner = _inner(layer)
        spec, kind = specs.get(inner.name), kernel_kind(inner)
        if spec is None or not spec.quantize or kind is None or _foreign(layer):
            continue
        kernels = [tf.convert_to_tensor(getattr(inner, a)).numpy() for a in kind.weight_attrs]
        table = cluster_table(kernels, 2 ** spec.weight_bits - 1, kind.channel_axis if kind.per_channel else None)
        if table is not None:
            tables[inner.name] = table
    return tables


def _init_sparsity_masks(qat_model) -> None:
    """Set each :class:`SparseWeightQuantizer`'s mask to its kernel's nonzeros (done once, here:
    the mask is fixed for the model's life and saved with it)."""
    for layer in qat_model.layers:
        for weight, quantizer, qvars in getattr(layer, "_weight_vars", []):
            if isinstance(quantizer, SparseWeightQuantizer) and qvars and "mask" in qvars:
                qvars["mask"].assign(tf.cast(tf.not_equal(weight, 0), qvars["mask"].dtype))


def _int8_only(layer, weight_bits) -> bool:
    """``layer`` would train below 8 bits, but TFLite stores its kind's weights only as int8."""
    kind = kernel_kind(layer)
    return bool(kind) and weight_bits is not None and weight_bits < 8 and not kind.int4_export


def unexportable_layers(qat_model) -> dict[str, str]:
    """``{layer name: setting}`` of the layers of a QAT model whose settings TFLite cannot
    deliver (only ``quantize(..., simulate_only=True)`` makes them).

    Read from the layers' quantize configs, which are saved with the model, so the answer is
    the same after ``save``/``load_model`` and ``clone_model``.
    """
    found = {}
    for layer in qat_model.layers:
        config = getattr(layer, "quantize_config", None)
        if config is None or not hasattr(layer, "layer"):
            continue
        activation_bits = getattr(config, "activation_bits", None)
        weight_bits = getattr(config, "weight_bits", None)
        if activation_bits is not None and activation_bits not in EXPORTABLE_ACTIVATION_BITS:
            found[layer.layer.name] = f"activation_bits={activation_bits}"
        elif _int8_only(layer.layer, weight_bits):
            found[layer.layer.name] = f"weight_bits={weight_bits} ({type(layer.layer).__name__}: int8 only)"
    return found


def _clamp_to_exportable(model, specs):
    """Layers whose kind TFLite cannot store below 8 bits (Conv2DTranspose, SeparableConv1D)
    train at 8 bits, with a warning naming them: training at 4 and exporting at 8 would
    make the file disagree with the QAT model (or fail to convert)."""
    clamped = {}
    for layer in model.layers:
        inner = _inner(layer)
        spec = specs.get(inner.name)
        if spec and spec.quantize and _int8_only(inner, spec.weight_bits):
            specs[inner.name] = LayerSpec(8, spec.activation_bits, True, spec.source + ", int8: exporter",
                                              spec.pack)
            clamped[inner.name] = type(inner).__name__
    if clamped:
        warnings.warn(
            f"keras_qx: TFLite stores these layers' weights only as int8, so they train at 8 bits: "
            f"{clamped}. Pass simulate_only=True to train them at the policy's bits anyway.",
            stacklevel=3,
        )
    return specs


def _init_weight_ranges(qat_model) -> None:
    """Set each weight quantizer's range from the current weights.

    tfmot starts weight ranges at [-6, 6] and only updates them in training steps, so a QAT
    model predicts (and exports) garbage until it has trained; this makes it usable at once.
    """
    for layer in qat_model.layers:
        for weight, quantizer, qvars in getattr(layer, "_weight_vars", []):
            if not isinstance(quantizer, WeightQuantizer) or not qvars:
                continue
            low, high = quantizer.range_for(quantizer.bound(tf.convert_to_tensor(weight)))
            qvars["min_var"].assign(tf.reshape(low, qvars["min_var"].shape))
            qvars["max_var"].assign(tf.reshape(high, qvars["max_var"].shape))

