"""``qx.cluster``: weight clustering on tfmot's clustering API, per layer in the policy's style,
and the centroid tables ``qx.quantize(..., preserve_clusters=True)`` trains.

The cluster count of each layer with kernels resolves as :func:`~keras_qx.compress.prune.prune`'s
sparsity does (later wins): ``clusters`` (the default) < each matching entry of ``rules`` in
order < ``layers[name]``. An entry sets ``clusters`` (2 or more), ``cluster`` (false: leave the
layer alone), ``init`` and ``per_channel``.

Cluster, fine-tune, :func:`strip_clustering` (each kernel then holds at most its cluster count
of distinct values), then quantize with ``qx.quantize(model, policy, preserve_clusters=True)``:
each kernel trains as a table of centroids and a fixed map of which centroid each weight takes
(:class:`~keras_qx.quant.quantizers.ClusterWeightQuantizer`; each centroid is its cluster's
mean), so it keeps at most that many
distinct values through QAT at any bits and in the TFLite file (per output channel where the
kernel is quantized per channel).

Example:
    >>> import keras_qx as qx
    >>> from keras_qx.data import digits_cnn
    >>> clustered = qx.cluster(digits_cnn(), 16, layers={"logits": {"cluster": False}})
    >>> sorted(l.name for l in clustered.layers if l.name.startswith("cluster_"))
    ['cluster_conv1', 'cluster_conv2', 'cluster_fc1']
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from keras_qx._compat import PACKAGE, cluster_config, cluster_wrapper, keras, quantize_annotate, tf
from keras_qx._graph import check_float_model
from keras_qx.compress.prune import check_not_pruned, resolve_layers
from keras_qx.quant.kinds import kernel_kind
from keras_qx.quant.quantizers import ClusterWeightQuantizer

__all__ = ["cluster", "strip_clustering", "ClusterSpec", "cluster_plan", "ClusterWeights", "clustered_layers",
           "check_not_clustered", "INITS", "cluster_table", "init_cluster_tables", "layer_distinct",
           "kernel_distinct"]

INITS = {"kmeans++": "KMEANS_PLUS_PLUS", "linear": "LINEAR", "density": "DENSITY_BASED", "random": "RANDOM"}
_FIELDS = ("clusters", "cluster", "init", "per_channel")


@dataclass(frozen=True)
class ClusterSpec:
    """The resolved clustering of one layer and where it came from (``source``); ``clusters``
    0 leaves the layer alone."""

    clusters: int = 0
    init: str = "kmeans++"
    per_channel: bool = False
    source: str = "default"

    @property
    def clustered(self) -> bool:
        return self.clusters > 0


def _check_clusters(value: Any, where: str, sparse: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: clusters is the number of distinct values a kernel may keep, an integer >= 2 "
                        f"(16 is common), got {value!r} ({type(value).__name__}).")
    least = 3 if sparse else 2
    if value < least:
        why = (" with preserve_sparsity=True (one cluster is the pruned zeros)" if sparse else
               " (one value for the whole kernel would remove the layer); leave a layer alone with "
               "layers={name: {'cluster': False}}")
        raise ValueError(f"{where}: clusters={value} is too few: use {least} or more{why}.")
    if value > 256:
        raise ValueError(f"{where}: clusters={value} is more than the 255 levels of an 8-bit grid could keep; "
                         "use at most 256 (16 or 32 is common).")
    return int(value)


def _check_init(value: Any, where: str) -> str:
    if value not in INITS:
        raise ValueError(f"{where}: init={value!r} is unknown; use one of {list(INITS)}.")
    return value


def _cluster_fields(out: dict, where: str) -> dict:
    if "clusters" in out:
        out["clusters"] = _check_clusters(out["clusters"], where)
    if "init" in out:
        out["init"] = _check_init(out["init"], where)
    for flag in ("cluster", "per_channel"):
        if flag in out and not isinstance(out[flag], bool):
            raise ValueError(f"{where}: {flag} must be True or False, got {out[flag]!r}.")
    return out


def _updated(spec: ClusterSpec, entry: Mapping, source: str) -> ClusterSpec:
    clusters = entry.get("clusters", spec.clusters)
    if entry.get("cluster") is False:
        clusters = 0
    return ClusterSpec(clusters, entry.get("init", spec.init), entry.get("per_channel", spec.per_channel), source)


def _per_channel_ok(layer) -> bool:
    return type(layer) is keras.layers.Conv2D  # tfmot clusters per channel Conv2D kernels only


def cluster_plan(model, clusters: int = 16, rules: Sequence[Mapping] | None = None,
                 layers: Mapping[str, Mapping] | None = None, init: str = "kmeans++", per_channel: bool = False,
                 preserve_sparsity: bool = False) -> dict[str, ClusterSpec]:
    """``{layer name: ClusterSpec}`` for every layer with kernels: what :func:`cluster` would do.

    A kernel with no more values than its cluster count (per channel with ``per_channel``) is
    left alone (it already holds no more distinct values); ``source`` then says so.

    Raises:
        ValueError/TypeError: fewer than 2 clusters (3 with ``preserve_sparsity``), an unknown
            init, key, layer name or type, a layer without kernels, ``per_channel`` asked of a
            layer that is not a Conv2D.
    """
    if not isinstance(per_channel, bool):
        raise ValueError(f"cluster(per_channel=...) must be True or False, got {per_channel!r}.")
    default = ClusterSpec(_check_clusters(clusters, "cluster(clusters=...)", preserve_sparsity),
                          _check_init(init, "cluster(init=...)"), per_channel)
    plan = {}
    explicit = set((layers or {}) if isinstance(layers, Mapping) else ())
    for layer, spec in resolve_layers(model, default, rules, layers, what="cluster", fields=_FIELDS,
                                      check_fields=_cluster_fields, update=_updated, example="{'clusters': 16}"):
        if spec.clustered and preserve_sparsity:
            _check_clusters(spec.clusters, f"cluster: layer {layer.name!r}", sparse=True)
        if spec.clustered and spec.per_channel and not _per_channel_ok(layer):
            if layer.name in explicit and spec.source == "layers":
                raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}): per_channel clustering is for "
                                 "Conv2D kernels only (tfmot); cluster it per tensor (per_channel: False).")
            spec = ClusterSpec(spec.clusters, spec.init, False, spec.source + ", per tensor (not a Conv2D)")
        if spec.clustered:
            kernels = [getattr(layer, a) for a in kernel_kind(layer).weight_attrs]
            per = [int(np.prod(k.shape)) // (int(k.shape[-1]) if spec.per_channel else 1) for k in kernels]
            if min(per) <= spec.clusters:
                spec = ClusterSpec(0, spec.init, spec.per_channel,
                                   f"{spec.source}; left alone: {min(per)} values <= {spec.clusters} clusters")
        plan[layer.name] = spec
    return plan


def _inner(layer):
    return layer.layer if isinstance(layer, quantize_annotate.QuantizeAnnotate) else layer


@keras.utils.register_keras_serializable(package=PACKAGE)
class ClusterWeights(cluster_wrapper.ClusterWeights):
    """tfmot's clustering wrapper for every layer kind keras_qx quantizes: the kernels of
    :func:`~keras_qx.quant.kinds.kernel_kind` are clustered (tfmot's registry skips
    DepthwiseConv2D's kernel and knows only its own classes, not EinsumDense or subclasses).

    tfmot accepts a layer its registry lacks only before it is built; :func:`cluster` hands it
    an unbuilt copy and builds it with the original's weights here."""

    def __init__(self, layer, *args, **kwargs):
        built = layer if layer.built else None
        if built is not None:  # a fresh copy: tfmot's registry accepts any layer without weights
            layer = type(built).from_config(built.get_config())
        kind = kernel_kind(layer)
        super().__init__(layer, *args, **kwargs)
        if kind is not None:
            attrs = tuple(kind.weight_attrs)
            layer.get_clusterable_weights = lambda: [(a, getattr(layer, a)) for a in attrs]
        if built is not None:
            shape = getattr(built, "_build_input_shape", None) or built.input_shape
            layer.build(shape)
            layer.set_weights(built.get_weights())


def clustered_layers(model) -> list:
    """The clustering wrappers of ``model`` (tfmot's or keras_qx's)."""
    return [l for l in getattr(model, "layers", []) if isinstance(l, cluster_wrapper.ClusterWeights)]


def check_not_clustered(model, what: str = "model") -> None:
    """Raise if ``model`` still has clustering wrappers (strip them before quantizing)."""
    wrapped = [l.name for l in clustered_layers(model)]
    if wrapped:
        raise ValueError(f"{what} {model.name!r} still has clustering wrappers ({wrapped[:3]}); call "
                         "qx.strip_clustering(model) after the clustering fine-tune, then quantize the stripped "
                         "model (preserve_clusters=True keeps the clusters).")


def cluster(model, clusters: int = 16, *, rules: Sequence[Mapping] | None = None,
            layers: Mapping[str, Mapping] | None = None, init: str = "kmeans++", per_channel: bool = False,
            preserve_sparsity: bool = False):
    """Return a copy of ``model`` whose kernels are clustered: each holds at most ``clusters``
    distinct values (trainable centroids; each weight takes its nearest), on tfmot's
    ``cluster_weights``.

    Args:
        model: a built tf_keras Sequential or Functional float model (not changed: the copy
            has its own weights); a pruned one after ``qx.strip_pruning``.
        clusters: the default number of distinct values per kernel, 2..256.
        rules: ``[{"type": "Dense", "match": "fc.*", "clusters": 8, "cluster": False,
            "init": "linear", "per_channel": True}]`` (``type`` and/or ``match``; later rules win).
        layers: ``{layer name: {"clusters": ..., "cluster": ..., "init": ..., "per_channel": ...}}``;
            wins over rules.
        init: how centroids start: ``"kmeans++"``, ``"linear"`` (evenly spaced between the
            kernel's min and max), ``"density"`` (by the weights' CDF) or ``"random"``.
        per_channel: cluster each output channel of a Conv2D kernel on its own (``clusters`` per
            channel; other kinds are clustered per tensor).
        preserve_sparsity: keep a pruned model's zeros (one cluster stays at exactly 0;
            needs 3 or more clusters).

    Train the result (``model.fit``), then :func:`strip_clustering`. A kernel with no more
    values than its cluster count is left alone.
    """
    check_float_model(model)
    check_not_pruned(model)
    check_not_clustered(model)
    if not isinstance(preserve_sparsity, bool):
        raise TypeError(f"cluster(preserve_sparsity=...) must be True or False, got {preserve_sparsity!r}.")
    nested = [l.name for l in model.layers if isinstance(l, keras.Model)]
    if nested:
        raise ValueError(f"model {model.name!r} nests model(s) {nested}; cluster each nested model itself (its "
                         "kernels would otherwise be left alone), or rebuild the model flat.")
    plan = cluster_plan(model, clusters, rules, layers, init, per_channel, preserve_sparsity)
    if not any(s.clustered for s in plan.values()):
        raise ValueError("cluster: every layer would be left alone ('cluster': False everywhere, or kernels "
                         f"smaller than their cluster count); nothing to cluster. Plan: {plan}")

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    init_enum = cluster_config.CentroidInitialization

    def wrap(layer):
        inner = _inner(layer)
        spec = plan.get(inner.name)
        if spec is None or not spec.clustered:
            return layer
        wrapper = ClusterWeights(inner, spec.clusters, getattr(init_enum, INITS[spec.init]),
                                 preserve_sparsity=preserve_sparsity, cluster_per_channel=spec.per_channel)
        if inner is not layer:  # qx.annotate's bits come back at strip_clustering (kept in memory, not saved)
            wrapper._qx_annotation = layer.quantize_config
        return wrapper

    clustered = keras.models.clone_model(copy, clone_function=wrap)
    clustered._name = model.name
    return clustered


def strip_clustering(model):
    """The clustered model without its wrappers: plain layers whose kernels hold the clustered
    values (at most each layer's cluster count of distinct values, per channel for per-channel
    clustering)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"strip_clustering takes a model from qx.cluster, got {type(model).__name__}.")
    wrappers = clustered_layers(model)
    if not wrappers:
        raise ValueError(f"model {model.name!r} has no clustering wrappers; strip_clustering takes the model "
                         "qx.cluster returned.")

    def unwrap(layer):
        if not isinstance(layer, cluster_wrapper.ClusterWeights):
            return layer
        layer.update_clustered_weights_associations()
        weights = layer.layer.get_weights()
        for position, name in sorted(layer.position_original_weights.items()):
            weights.insert(position, np.asarray(layer.get_weight_from_layer(name)))
        config = layer.layer.get_config()
        if hasattr(layer, "_batch_input_shape") and "batch_input_shape" not in config:
            config["batch_input_shape"] = layer._batch_input_shape  # the first layer of a Sequential (as tfmot)
        clean = type(layer.layer).from_config(config)
        clean.build(layer.build_input_shape)
        clean.set_weights(weights)
        annotation = getattr(layer, "_qx_annotation", None)
        return clean if annotation is None else quantize_annotate.QuantizeAnnotate(clean, quantize_config=annotation)

    stripped = keras.models.clone_model(model, clone_function=unwrap)
    stripped._name = model.name
    return stripped


# The tables of qx.quantize(..., preserve_clusters=True).


def _slices(values: np.ndarray, axis: int | None) -> np.ndarray:
    """``values`` as rows of one table each: (groups, values per group)."""
    if axis is None:
        return values.reshape(1, -1)
    moved = np.moveaxis(values, axis, -1)
    return moved.reshape(-1, moved.shape[-1]).T


def cluster_table(kernels: Sequence[np.ndarray], levels: int, channel_axis: int | None) -> tuple | None:
    """``(clusters, cluster_axis)`` of the table a layer's kernels train as with
    ``preserve_clusters=True``, or None (train them as usual).

    A kernel is held to its distinct values when it has fewer than its values and at most
    ``levels`` (the grid's: more could not survive quantization anyway): per tensor if the
    whole kernel qualifies, else per channel along ``channel_axis`` (a per-channel quantized
    kernel clustered per channel) if every channel does.
    """
    kernels = [np.asarray(k) for k in kernels]
    for axis in (None, channel_axis) if channel_axis is not None else (None,):
        rows = [_slices(k, axis) for k in kernels]
        counts = [max(np.unique(r).size for r in k_rows) for k_rows in rows]
        if all(c <= levels and c < k_rows.shape[1] for c, k_rows in zip(counts, rows)):
            return max(counts), axis
    return None


def _table(values: np.ndarray, clusters: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    rows = _slices(values, axis)
    table = np.empty((rows.shape[0], clusters), values.dtype)
    index = np.empty(rows.shape, np.int32)
    for g, row in enumerate(rows):
        uniq, inverse = np.unique(row, return_inverse=True)
        if uniq.size > clusters:
            raise ValueError(f"a kernel slice holds {uniq.size} distinct values, more than its table's {clusters}.")
        table[g] = np.concatenate([uniq, np.full(clusters - uniq.size, uniq[-1], values.dtype)])
        index[g] = g * clusters + inverse.reshape(-1)
    if axis is None:
        return table, index.reshape(values.shape)
    moved_shape = np.moveaxis(values, axis, -1).shape
    return table, np.moveaxis(index.T.reshape(moved_shape), -1, axis)


def init_cluster_tables(qat_model) -> None:
    """Set each :class:`ClusterWeightQuantizer`'s index map (and centroid mask) from its
    kernel's values (done once, by ``qx.quantize``: the map is fixed for the model's life and
    saved with it)."""
    for layer in qat_model.layers:
        for weight, quantizer, qvars in getattr(layer, "_weight_vars", []):
            if not isinstance(quantizer, ClusterWeightQuantizer) or not qvars:
                continue
            values = np.asarray(weight)
            table, index = _table(values, quantizer.clusters, quantizer.cluster_axis)
            qvars["cluster_index"].assign(index)
            if "centroid_mask" in qvars:
                qvars["centroid_mask"].assign((table != 0).astype(table.dtype))
            rebuilt = np.asarray(quantizer.kernel(tf.convert_to_tensor(weight), qvars))
            if not np.array_equal(rebuilt, values):
                raise AssertionError(f"layer {layer.name!r}: the centroid table does not rebuild the kernel.")


def _distinct(values: np.ndarray, axis: int | None) -> int:
    return max(np.unique(r).size for r in _slices(values, axis))


def layer_distinct(layer) -> tuple[int, int | None] | None:
    """``(distinct values, most distinct values in one output channel or None)`` of the kernels
    of ``layer`` as it computes with them (the largest over its kernels): a QAT wrapper's
    quantized kernels (the values the file stores; per channel where a kernel is quantized per
    channel, since the file's integers share a scale only within a channel), a clustering
    wrapper's clustered kernels, a float layer's kernels. None: no kernels."""
    found = []
    if isinstance(layer, cluster_wrapper.ClusterWeights):
        found = [(np.asarray(layer.get_weight_from_layer(n)), None) for n in layer.position_original_weights.values()]
    elif hasattr(layer, "_weight_vars") and hasattr(layer, "quantize_config"):
        for w, q, qvars in layer._weight_vars:
            value = np.asarray(q(tf.convert_to_tensor(w), False, qvars)) if qvars else np.asarray(w)
            found.append((value, getattr(q, "channel_axis", -1) if getattr(q, "per_channel", False) else None))
    else:
        kind = kernel_kind(layer)
        found = [(np.asarray(getattr(layer, a)), None) for a in kind.weight_attrs] if kind is not None else []
    if not found:
        return None
    channel = [_distinct(v, a) for v, a in found if a is not None]
    return max(_distinct(v, None) for v, _ in found), (max(channel) if channel else None)


def kernel_distinct(model) -> dict[str, tuple]:
    """``{layer name: (distinct values, most in one channel or None)}`` of a float, clustered or
    QAT model's kernels (wrapper names unwrapped)."""
    out = {}
    for layer in model.layers:
        value = layer_distinct(layer)
        if value is not None:
            out[getattr(layer, "layer", layer).name] = value
    return out

