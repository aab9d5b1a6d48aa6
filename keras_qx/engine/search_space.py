"""What a bit-width search chooses from: the space (per layer or per group, tied layers
together, float islands allowed), the soft size objective and the training options, and the
pure functions from an assignment to its cost and its policy. Used by :mod:`.search`.

Example:
    >>> from keras_qx.engine.search_space import SearchSpace
    >>> SearchSpace(candidates=(8, 4)).candidates
    (4, 8)
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from keras_qx._compat import keras
from keras_qx.engine.allocate import find_ties
from keras_qx.engine.sensitivity import quantizable_layers
from keras_qx.quant.cost import check_size, layer_size
from keras_qx.quant.policy import Policy, rule_matches
from keras_qx.quant.quantizers import WEIGHT_BITS

__all__ = ["SearchSpace", "SizePenalty", "TrainOptions", "FLOAT", "HP_PREFIX", "assignment_cost", "assignment_latency",
           "with_latency",
           "assignment_policy", "digest", "is_worker", "make_objective"]

FLOAT = 32  # the choice value meaning "keep this layer float"
HP_PREFIX = "bits/"


# ---- options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSpace:
    """What the search chooses from.

    Args:
        candidates: weight bit widths (2..8) every searched layer may take.
        groups: entries ``{"type": "Dense"}``, ``{"match": regex}`` or a list of layer names;
            the layers of one entry share one choice. Tied layers (``find_ties``: depthwise
            + pointwise pairs) always share one.
        allow_float: layer names or regexes (full match) that may also stay float
            (choice ``FLOAT`` = 32, costing 4 bytes a value).
        size: what a choice costs: ``"kernel"`` (kernel bytes as stored) or ``"gzip"`` (their
            predicted gzip'd bytes, :func:`keras_qx.quant.cost.kernel_gzip_bytes`).
    """

    candidates: tuple = (4, 8)
    groups: tuple = ()
    allow_float: tuple = ()
    size: str = "kernel"

    def __post_init__(self):
        check_size(self.size)
        cands = self.candidates
        if isinstance(cands, (str, bytes)) or not isinstance(cands, Sequence) or not cands:
            raise ValueError(f"candidates must be a non-empty sequence of bit widths like (4, 8), got {cands!r}.")
        bad = [c for c in cands if isinstance(c, bool) or not isinstance(c, int) or c not in WEIGHT_BITS]
        if bad:
            raise ValueError(f"candidates {bad} are not weight bit widths: use integers in "
                             f"{WEIGHT_BITS.start}..{WEIGHT_BITS.stop - 1}, e.g. candidates=(4, 8).")
        if len(set(cands)) != len(cands):
            raise ValueError(f"candidates {tuple(cands)} repeat a bit width.")
        object.__setattr__(self, "candidates", tuple(sorted(cands)))
        groups = self.groups
        if groups is None:
            groups = ()
        if isinstance(groups, (str, dict)) or not isinstance(groups, Sequence):
            raise ValueError("groups must be a list of {'type': ...}, {'match': ...} or lists of layer names, "
                             f"got {groups!r}.")
        for i, spec in enumerate(groups):
            if isinstance(spec, dict):
                keys = set(spec)
                if len(keys) != 1 or not keys <= {"type", "match"} or not isinstance(next(iter(spec.values())), str):
                    raise ValueError(f"groups[{i}] {spec!r}: give exactly one of {{'type': 'Dense'}} or "
                                     "{'match': 'regex'}.")
                if "match" in spec:
                    _compile(spec["match"], f"groups[{i}]")
            elif isinstance(spec, (list, tuple)) and spec and all(isinstance(n, str) for n in spec):
                pass
            else:
                raise ValueError(f"groups[{i}] {spec!r}: give {{'type': ...}}, {{'match': ...}} or a list of names.")
        object.__setattr__(self, "groups", tuple(tuple(s) if isinstance(s, list) else s for s in groups))
        allow = self.allow_float or ()
        if isinstance(allow, str):
            allow = (allow,)
        if not all(isinstance(a, str) for a in allow):
            raise ValueError(f"allow_float must be layer names or regexes, got {self.allow_float!r}.")
        for a in allow:
            _compile(a, "allow_float")
        object.__setattr__(self, "allow_float", tuple(allow))

    def units(self, model) -> list["_Unit"]:
        """One searched choice per group of layers of ``model``, in layer order."""
        layers = quantizable_layers(model)
        names = [l.name for l in layers]
        by_name = dict(zip(names, layers))
        parent = {n: n for n in names}

        def root(n):
            while parent[n] != n:
                n = parent[n]
            return n

        def union(members):
            members = [m for m in members if m in parent]
            for m in members[1:]:
                parent[root(m)] = root(members[0])

        labels = {}
        for i, spec in enumerate(self.groups):
            members = _group_members(spec, layers)
            if not members:
                raise ValueError(f"groups[{i}] {spec!r} matches no quantizable layer; they are {names}.")
            union(members)
            labels.setdefault(root(members[0]), _group_label(spec))
        for tie in find_ties(model):
            union(tie)
        for a in self.allow_float:
            if not any(_matches(a, n) for n in names):
                raise ValueError(f"allow_float entry {a!r} matches no quantizable layer; they are {names}.")
        components = {}
        for n in names:
            components.setdefault(root(n), []).append(n)
        units = []
        for key, members in components.items():
            label = labels.get(key) or "+".join(members)
            choices = list(self.candidates)
            if self.allow_float and all(any(_matches(a, m) for a in self.allow_float) for m in members):
                choices.append(FLOAT)
            costs = {c: sum(layer_size(by_name[m], None if c == FLOAT else c, self.size) for m in members)
                     for c in choices}
            # a width is dropped where more bits cost no more (2/3-bit kernels are stored as INT4)
            kept = [c for c in choices if not any(c2 > c and costs[c2] <= costs[c] for c2 in choices)]
            units.append(_Unit(HP_PREFIX + label, tuple(members), tuple(kept), {c: costs[c] for c in kept}))
        return units


@dataclass(frozen=True)
class SizePenalty:
    """AutoQKeras's forgiving factor (see the module docstring for the formula)."""

    delta_p: float = 8.0
    delta_n: float = 8.0
    rate: float = 2.0
    reference_bytes: int | None = None  # None: the uniform-int8 kernel bytes

    def __post_init__(self):
        for name in ("delta_p", "delta_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"size_penalty {name} must be a percentage >= 0, got {value!r}.")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or self.rate <= 1:
            raise ValueError(f"size_penalty rate must be a number > 1, got {self.rate!r}.")

    @classmethod
    def coerce(cls, value) -> "SizePenalty | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(delta_p=float(value), delta_n=float(value))
        if isinstance(value, dict):
            unknown = set(value) - {"delta_p", "delta_n", "rate", "reference_bytes"}
            if unknown:
                raise ValueError(f"size_penalty has unknown key(s) {sorted(unknown)}; use delta_p, delta_n, rate.")
            return cls(**value)
        raise TypeError(f"size_penalty must be None, a percentage, a dict or a SizePenalty, got {value!r}.")

    def score(self, metric: float, size: float, reference: float) -> float:
        d = (self.delta_p if size < reference else self.delta_n) / 100.0
        return float(metric) * (1.0 + d * math.log(reference / max(size, 1)) / math.log(self.rate))


@dataclass
class TrainOptions:
    """How each trial trains: optimizer (a learning rate for Adam, or a factory returning
    a tf_keras optimizer), loss (None: ``infer_loss``), metrics (None: the objective's)."""

    qat_lr: float | Callable = 1e-4
    loss: Any = None
    metrics: Any = None
    warm_start: bool = True
    seed: int | None = None

    def optimizer(self):
        if callable(self.qat_lr):
            opt = self.qat_lr()
            if not isinstance(opt, keras.optimizers.Optimizer):
                raise TypeError(f"qat_lr factory returned {type(opt).__name__}; it must return a tf_keras "
                                "optimizer, e.g. lambda: tf_keras.optimizers.Adam(1e-4).")
            return opt
        return keras.optimizers.Adam(self.qat_lr)


@dataclass(frozen=True)
class _Unit:
    hp: str  # hyperparameter name
    layers: tuple
    choices: tuple
    costs: dict = field(compare=False)
    us: dict | None = field(default=None, compare=False)  # {choice: predicted µs}, with a latency table


def with_latency(units, table) -> list:
    """``units`` with each choice's predicted microseconds from a
    :class:`~keras_qx.engine.latency.LatencyTable` (a float choice reads the table's ``None``)."""
    out = []
    for u in units:
        us = {}
        for c in u.choices:
            width = None if c == FLOAT else c
            missing = [m for m in u.layers if width not in table.layers.get(m, {})]
            if missing:
                raise ValueError(f"the latency table has no time for layer(s) {missing} at "
                                 f"{'float' if width is None else f'{width} bits'}; measure it for this model and "
                                 "candidates (latency_table(model, candidates)).")
            us[c] = float(sum(table.layers[m][width] for m in u.layers))
        out.append(replace(u, us=us))
    return out


def assignment_latency(units, values) -> float | None:
    """The layers' predicted microseconds of an assignment (without the table's ``base_us``),
    or None where the units carry no times."""
    if not units or any(u.us is None for u in units):
        return None
    return float(sum(u.us[values.get(u.hp, max(u.costs))] for u in units))


# ---- small helpers ------------------------------------------------------------------------
def _compile(pattern, what):
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"{what}: {pattern!r} is not a valid regex ({err}).") from None


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or re.fullmatch(pattern, name) is not None


def _group_members(spec, layers) -> list[str]:
    if isinstance(spec, dict):
        return [l.name for l in layers if rule_matches(spec, l)]
    names = [l.name for l in layers]
    unknown = [n for n in spec if n not in names]
    if unknown:
        raise ValueError(f"groups entry {list(spec)} names {unknown}, not quantizable layers; they are {names}.")
    return list(spec)


def _group_label(spec) -> str:
    if isinstance(spec, dict):
        key, value = next(iter(spec.items()))
        return f"{key}={value}"
    return "+".join(spec)


def digest(units, values) -> str:
    return ",".join("f" if values.get(u.hp) == FLOAT else str(values.get(u.hp, "?")) for u in units)


def assignment_policy(units, values, meta=None) -> Policy:
    bits = {}
    for u in units:
        chosen = values.get(u.hp, max(c for c in u.choices if c != FLOAT))
        bits.update({name: None if chosen == FLOAT else chosen for name in u.layers})
    return Policy.from_bits(bits, meta)


def assignment_cost(units, values) -> int:
    return int(sum(u.costs[values.get(u.hp, max(u.costs))] for u in units))


def is_worker() -> bool:
    return bool(os.environ.get("KERASTUNER_ORACLE_IP")) and "chief" not in os.environ.get("KERASTUNER_TUNER_ID", "")


def make_objective(objective, kt):
    if isinstance(objective, kt.Objective):
        return objective
    if not isinstance(objective, str) or not objective:
        raise TypeError(f"objective must be a metric name like 'val_accuracy' or a keras_tuner.Objective, "
                        f"got {objective!r}.")
    base = objective[4:] if objective.startswith("val_") else objective
    if "loss" in base or base.endswith("error") or base in ("mse", "mae"):
        return kt.Objective(objective, "min")
    if any(k in base for k in ("acc", "auc", "precision", "recall", "f1", "iou")):
        return kt.Objective(objective, "max")
    raise ValueError(f"objective {objective!r}: cannot tell whether to maximise or minimise it; pass "
                     f"keras_tuner.Objective({objective!r}, direction='max' or 'min').")

