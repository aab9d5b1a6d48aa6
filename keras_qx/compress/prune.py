"""``qx.prune``: magnitude pruning on tfmot's sparsity API, per layer in the policy's style.

The sparsity of each layer with kernels resolves as a policy's bits do (later wins):
``sparsity`` (the default) < each matching entry of ``rules`` in order < ``layers[name]``. A
rule matches by ``type`` (a class name of the layer or a base class) and/or ``match`` (a regex
on the whole layer name); an entry sets ``sparsity`` (0 leaves the layer dense), ``prune``
(false: leave it dense) and ``block_size``.

Prune, fine-tune with :func:`pruning_callbacks`, :func:`strip_pruning`, then quantize with
``qx.quantize(model, policy, preserve_sparsity=True)``: the zeros then stay zeros through QAT
and in the TFLite file.

Example:
    >>> import keras_qx as qx
    >>> from keras_qx.data import digits_cnn
    >>> pruned = qx.prune(digits_cnn(), 0.8, layers={"logits": {"prune": False}})
    >>> sorted(l.name for l in pruned.layers if l.name.startswith("prune_"))
    ['prune_low_magnitude_conv1', 'prune_low_magnitude_conv2', 'prune_low_magnitude_fc1']
"""
from __future__ import annotations

import difflib
import numbers
import re
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from keras_qx._compat import PACKAGE, keras, pruning_wrapper, quantize_annotate, tf, tfmot
from keras_qx._graph import check_float_model
from keras_qx.quant.kinds import kernel_kind
from keras_qx.quant.policy import known_type_names, rule_matches

__all__ = ["prune", "pruning_callbacks", "strip_pruning", "PruneSpec", "prune_plan", "PruneLowMagnitude",
           "pruned_layers", "check_not_pruned", "layer_sparsity", "kernel_sparsity", "SCHEDULES"]

SCHEDULES = ("constant", "polynomial")
_FIELDS = ("sparsity", "prune", "block_size")


@dataclass(frozen=True)
class PruneSpec:
    """The resolved pruning of one layer and where it came from (``source``)."""

    sparsity: float = 0.0
    block_size: tuple = (1, 1)
    source: str = "default"

    @property
    def pruned(self) -> bool:
        return self.sparsity > 0


def _check_sparsity(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: sparsity is the fraction of kernel values set to zero, a number in [0, 1) "
                        f"(0.8 prunes 80%), got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not 0.0 <= value < 1.0:
        hint = f"; {value:g} looks like a percentage: write {value / 100:g}" if 1.0 < value < 100.0 else ""
        raise ValueError(f"{where}: sparsity={value:g} is outside [0, 1): it is the fraction of kernel values "
                         f"set to zero (0.8 prunes 80%; 1.0 would remove the layer){hint}.")
    return value


def _check_block(value: Any, where: str) -> tuple:
    if value is None:
        return (1, 1)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{where}: block_size must be None or two positive integers (rows, columns of the "
                         f"kernel), e.g. (1, 4), got {value!r}.")
    return (int(value[0]), int(value[1]))


def _check_step(value: Any, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (1 if name == "frequency" else 0):
        least = 1 if name == "frequency" else 0
        raise ValueError(f"prune({name}=...) must be an integer >= {least} (training steps), got {value!r}.")
    return int(value)


def check_entry(entry: Any, where: str, allowed: Sequence[str], check_fields, example: str) -> dict:
    """A rule or ``layers`` entry as a checked dict: a mapping (like ``example``) with only
    ``allowed`` keys, its fields checked (and normalised) by ``check_fields(entry, where)``."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a dict like {example}, got {entry!r}.")
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; allowed keys: {list(allowed)}.")
    return check_fields(dict(entry), where)


def _prune_fields(out: dict, where: str) -> dict:
    if "sparsity" in out:
        out["sparsity"] = _check_sparsity(out["sparsity"], where)
    if "block_size" in out:
        out["block_size"] = _check_block(out["block_size"], where)
    if "prune" in out and not isinstance(out["prune"], bool):
        raise ValueError(f"{where}: prune must be True or False, got {out['prune']!r}.")
    return out


def _inner(layer):
    """The layer a ``qx.annotate`` wrapper holds (the layer itself otherwise)."""
    return layer.layer if isinstance(layer, quantize_annotate.QuantizeAnnotate) else layer


def _updated(spec: PruneSpec, entry: Mapping, source: str) -> PruneSpec:
    sparsity = entry.get("sparsity", spec.sparsity)
    if entry.get("prune") is False:
        sparsity = 0.0
    return PruneSpec(sparsity, entry.get("block_size", spec.block_size), source)


def resolve_layers(model, default, rules, layers, *, what: str, fields: Sequence[str], check_fields,
                   update, example: str) -> list[tuple[Any, Any]]:
    """``[(layer, spec)]`` for every layer of ``model`` with kernels, the spec resolved as a
    policy's bits are (later wins): ``default`` < each matching rule of ``rules`` in order <
    ``layers[name]``. ``update(spec, entry, source)`` applies an entry; ``what`` ("prune",
    "cluster") names the caller in errors. Shared by :func:`prune_plan` and
    ``keras_qx.compress.cluster.cluster_plan``.
    """
    rules = [] if rules is None else rules
    if not isinstance(rules, (list, tuple)):
        raise ValueError(f"{what}(rules=...) must be a list of dicts, got {type(rules).__name__}.")
    checked = []
    for i, rule in enumerate(rules):
        rule = check_entry(rule, f"{what} rule {i}", ("type", "match") + tuple(fields), check_fields, example)
        if "type" not in rule and "match" not in rule:
            raise ValueError(f"{what} rule {i} ({rule}) needs a 'type' (class name) or a 'match' (regex on the layer name).")
        if "match" in rule:
            try:
                re.compile(rule["match"])
            except (re.error, TypeError) as err:
                raise ValueError(f"{what} rule {i}: 'match' {rule['match']!r} is not a valid regex ({err}).") from None
        checked.append(rule)
    layers = {} if layers is None else layers
    if not isinstance(layers, Mapping):
        raise ValueError(f"{what}(layers=...) must be a dict layer name -> a dict like {example}, got {type(layers).__name__}.")
    layers = {str(n): check_entry(e, f"{what} layers[{n!r}]", fields, check_fields, example) for n, e in layers.items()}

    model_layers = [_inner(l) for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    names = [l.name for l in model_layers]
    missing = [n for n in layers if n not in names]
    if missing:
        hints = {n: difflib.get_close_matches(n, names, n=3) for n in missing}
        raise ValueError(f"{what}(layers=...) names layer(s) the model lacks: {missing}. Closest names: {hints}. "
                         f"Model layers: {names}.")
    by_name = {l.name: l for l in model_layers}
    kernelless = [n for n in layers if kernel_kind(by_name[n]) is None]
    if kernelless:
        raise ValueError(f"{what}(layers=...) names layer(s) without kernels, which have nothing to {what}: {kernelless}.")
    known = known_type_names(model_layers)
    for i, rule in enumerate(checked):
        if "type" in rule and rule["type"] not in known:
            close = difflib.get_close_matches(rule["type"], sorted(known), n=3)
            raise ValueError(f"{what} rule {i}: unknown layer type {rule['type']!r}; did you mean {close}?")

    out = []
    for layer in model_layers:
        if kernel_kind(layer) is None:
            continue
        spec = default
        for i, rule in enumerate(checked):
            if rule_matches(rule, layer):
                spec = update(spec, rule, f"rule {i}")
        if layer.name in layers:
            spec = update(spec, layers[layer.name], "layers")
        out.append((layer, spec))
    return out


def prune_plan(model, sparsity: float = 0.8, rules: Sequence[Mapping] | None = None,
               layers: Mapping[str, Mapping] | None = None, block_size=None) -> dict[str, PruneSpec]:
    """``{layer name: PruneSpec}`` for every layer with kernels: what :func:`prune` would do.

    Raises:
        ValueError/TypeError: a sparsity outside [0, 1), an unknown key, a layer name the model
            lacks, a layer without kernels, a rule type no layer class has, block sparsity on a
            kernel that is not 2-D.
    """
    default = PruneSpec(_check_sparsity(sparsity, "prune(sparsity=...)"), _check_block(block_size, "prune(block_size=...)"))
    plan = {}
    for layer, spec in resolve_layers(model, default, rules, layers, what="prune", fields=_FIELDS,
                                      check_fields=_prune_fields, update=_updated, example="{'sparsity': 0.5}"):
        if spec.pruned and spec.block_size != (1, 1):
            ranks = [len(getattr(layer, a).shape) for a in kernel_kind(layer).weight_attrs]
            if any(r != 2 for r in ranks):
                raise ValueError(
                    f"layer {layer.name!r} ({type(layer).__name__}): block_size={spec.block_size} needs a 2-D kernel, "
                    f"its kernel has rank {ranks[0]} (tfmot prunes blocks of Dense kernels only). Give the block "
                    "size to the Dense layers alone: rules=[{'type': 'Dense', 'block_size': (4, 1)}].")
        plan[layer.name] = spec
    return plan


def _kernels(layer, attrs):
    return [getattr(layer, a) for a in attrs]


@keras.utils.register_keras_serializable(package=PACKAGE)
class PruneLowMagnitude(pruning_wrapper.PruneLowMagnitude):
    """tfmot's pruning wrapper for every layer kind keras_qx quantizes: the kernels of
    :func:`~keras_qx.quant.kinds.kernel_kind` are pruned (tfmot's own registry skips
    DepthwiseConv2D's kernel and does not know EinsumDense)."""

    def __init__(self, layer, **kwargs):
        kind = kernel_kind(layer)
        if kind is not None and not hasattr(layer, "get_prunable_weights"):
            attrs = tuple(kind.weight_attrs)
            layer.get_prunable_weights = lambda: _kernels(layer, attrs)
        super().__init__(layer, **kwargs)


def pruned_layers(model) -> list:
    """The pruning wrappers of ``model`` (tfmot's or keras_qx's)."""
    return [l for l in getattr(model, "layers", []) if isinstance(l, pruning_wrapper.PruneLowMagnitude)]


def check_not_pruned(model, what: str = "model") -> None:
    """Raise if ``model`` still has pruning wrappers (strip them before quantizing or exporting)."""
    wrapped = [l.name for l in pruned_layers(model)]
    if wrapped:
        raise ValueError(f"{what} {model.name!r} still has pruning wrappers ({wrapped[:3]}); call "
                         "qx.strip_pruning(model) after the pruning fine-tune, then quantize the stripped model.")


def _schedule(kind: str, sparsity: float, begin_step: int, end_step: int | None, frequency: int):
    sparsity_api = tfmot.sparsity.keras
    if kind == "constant":
        return sparsity_api.ConstantSparsity(sparsity, begin_step, -1 if end_step is None else end_step, frequency)
    return sparsity_api.PolynomialDecay(0.0, sparsity, begin_step, end_step, frequency=frequency)


def prune(model, sparsity: float = 0.8, *, rules: Sequence[Mapping] | None = None,
          layers: Mapping[str, Mapping] | None = None, schedule: str = "constant", block_size=None,
          begin_step: int = 0, end_step: int | None = None, frequency: int = 100):
    """Return a copy of ``model`` whose kernels are pruned by magnitude while it trains.

    Args:
        model: a built tf_keras Sequential or Functional float model (not changed: the copy
            has its own weights).
        sparsity: the default fraction of each kernel set to zero, in [0, 1).
        rules: ``[{"type": "Dense", "match": "fc.*", "sparsity": 0.9, "prune": False,
            "block_size": (4, 1)}]`` (``type`` and/or ``match``; later rules win).
        layers: ``{layer name: {"sparsity": ..., "prune": ..., "block_size": ...}}``; wins over rules.
        schedule: ``"constant"`` (the target from ``begin_step`` on) or ``"polynomial"`` (from 0 at
            ``begin_step`` to the target at ``end_step``, which it needs).
        block_size: prune blocks of (rows, columns) of 2-D kernels (Dense) together.
        begin_step, end_step, frequency: training steps; the mask is recomputed every
            ``frequency`` steps between ``begin_step`` and ``end_step`` (None: no end).

    Train the result with ``callbacks=qx.pruning_callbacks()``, then :func:`strip_pruning`.
    The sparsity reached is the target rounded to whole kernel values (and, with
    ``"polynomial"``, that of the last mask update at or before ``end_step``).
    """
    check_float_model(model)
    check_not_pruned(model)
    nested = [l.name for l in model.layers if isinstance(l, keras.Model)]
    if nested:
        raise ValueError(f"model {model.name!r} nests model(s) {nested}; prune each nested model itself (its "
                         "kernels would otherwise be left dense), or rebuild the model flat.")
    if schedule not in SCHEDULES:
        raise ValueError(f"prune(schedule={schedule!r}): use one of {list(SCHEDULES)}.")
    begin_step = _check_step(begin_step, "begin_step")
    end_step = _check_step(end_step, "end_step", allow_none=True)
    frequency = _check_step(frequency, "frequency")
    if schedule == "polynomial" and end_step is None:
        raise ValueError("prune(schedule='polynomial') needs end_step: the training step at which the sparsity "
                         "reaches its target (e.g. epochs * steps per epoch).")
    if end_step is not None and end_step < begin_step:
        raise ValueError(f"prune(end_step={end_step}) comes before begin_step={begin_step}.")
    plan = prune_plan(model, sparsity, rules, layers, block_size)
    if not any(s.pruned for s in plan.values()):
        raise ValueError("prune: every layer would stay dense (sparsity 0 or prune: False everywhere); nothing to prune.")

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())

    def wrap(layer):
        inner = _inner(layer)
        spec = plan.get(inner.name)
        if spec is None or not spec.pruned:
            return layer
        wrapper = PruneLowMagnitude(inner, pruning_schedule=_schedule(schedule, spec.sparsity, begin_step, end_step,
                                                                      frequency), block_size=spec.block_size)
        if inner is not layer:  # qx.annotate's bits come back at strip_pruning (kept in memory, not saved)
            wrapper._qx_annotation = layer.quantize_config
        return wrapper

    pruned = keras.models.clone_model(copy, clone_function=wrap)
    pruned._name = model.name
    return pruned


def pruning_callbacks(logdir: str | None = None) -> list:
    """The callbacks a model from :func:`prune` trains with: tfmot's ``UpdatePruningStep`` and,
    with ``logdir``, ``PruningSummaries`` (sparsity and thresholds for TensorBoard)."""
    sparsity_api = tfmot.sparsity.keras
    callbacks = [sparsity_api.UpdatePruningStep()]
    if logdir is not None:
        callbacks.append(sparsity_api.PruningSummaries(log_dir=str(logdir)))
    return callbacks


def strip_pruning(model):
    """The pruned model without its wrappers: plain layers whose kernels hold the zeros (each
    mask is applied once more first, so a last optimizer step cannot have left a value)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"strip_pruning takes a model from qx.prune, got {type(model).__name__}.")
    wrappers = pruned_layers(model)
    if not wrappers:
        raise ValueError(f"model {model.name!r} has no pruning wrappers; strip_pruning takes the model qx.prune returned.")
    for layer in wrappers:
        for weight, mask, _ in layer.pruning_vars:
            weight.assign(weight * mask)
    never = [l.layer.name for l in wrappers if l.pruning_vars and all(np.all(np.asarray(m) == 1) for _, m, _ in l.pruning_vars)]
    if never:
        warnings.warn(f"keras_qx: layer(s) {never} were never pruned: no mask was computed, so their kernels are "
                      "dense. Train the pruned model with callbacks=qx.pruning_callbacks() for at least "
                      "begin_step + frequency steps (prune(..., frequency=...) sets how often masks update).",
                      stacklevel=2)

    def unwrap(layer):
        if not isinstance(layer, pruning_wrapper.PruneLowMagnitude):
            return layer
        inner = layer.layer
        if not hasattr(inner, "_batch_input_shape") and hasattr(layer, "_batch_input_shape"):
            inner._batch_input_shape = layer._batch_input_shape  # the first layer of a Sequential (as tfmot)
        annotation = getattr(layer, "_qx_annotation", None)
        return inner if annotation is None else quantize_annotate.QuantizeAnnotate(inner, quantize_config=annotation)

    stripped = keras.models.clone_model(model, clone_function=unwrap)
    stripped._name = model.name
    return stripped


def layer_sparsity(layer) -> float | None:
    """Fraction of zeros in the kernels of ``layer`` as it computes with them: a float layer's
    kernels, a pruning wrapper's masked kernels, or a QAT wrapper's quantized kernels (the values
    the TFLite file stores, zeros from rounding included). None: no kernels."""
    if isinstance(layer, pruning_wrapper.PruneLowMagnitude):
        values = [np.asarray(w) * np.asarray(m) for w, m, _ in layer.pruning_vars]
    elif hasattr(layer, "_weight_vars") and hasattr(layer, "quantize_config"):
        values = [np.asarray(q(tf.convert_to_tensor(w), False, qvars)) if qvars else np.asarray(w)
                  for w, q, qvars in layer._weight_vars]
    else:
        kind = kernel_kind(layer)
        values = [np.asarray(getattr(layer, a)) for a in kind.weight_attrs] if kind is not None else []
    size = sum(v.size for v in values)
    if not size:
        return None
    return float(sum(int(np.count_nonzero(v == 0)) for v in values)) / size


def kernel_sparsity(model) -> dict[str, float]:
    """``{layer name: fraction of zeros}`` of a float, pruned or QAT model's kernels (wrapper
    names unwrapped: ``fc1``, not ``quant_fc1``)."""
    out = {}
    for layer in model.layers:
        value = layer_sparsity(layer)
        if value is not None:
            out[getattr(layer, "layer", layer).name] = value
    return out
