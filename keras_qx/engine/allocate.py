"""Exact bit allocation under a size budget, and ``qx.auto_policy``.

The allocation is a multiple-choice knapsack: pick one bit width per layer (or per group of
tied layers) to minimise the summed sensitivity subject to the summed kernel bytes of the
shared cost model staying within the budget. It is solved exactly by dynamic programming
over layers on the Pareto frontier of (bytes, damage) partial solutions: a partial solution
that costs more and damages more than another can never be part of an optimum, so pruning
them loses nothing. (Past ``max_states`` frontier points, the frontier is thinned to the
best point per cost bucket; the result is then approximate, and says so in
``resolution_bytes``: no worse than the exact optimum under a budget that many bytes smaller.
Models of up to a few hundred layers stay exact.)

Example:
    >>> policy = qx.auto_policy(model, x, y, budget="0.6x")       # doctest: +SKIP
    >>> policy.meta["auto_policy"]["predicted_kernel_bytes"]         # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from keras_qx._compat import keras
from keras_qx._graph import inbound_layers
from keras_qx._deprecation import check_verbose, warn_renamed
from keras_qx._io import legacy_xy
from keras_qx.quant.kinds import kernel_kind
from keras_qx.quant.cost import SIZE_UNITS, check_size, kernel_params, layer_size, total_size
from keras_qx.quant.policy import Policy, PolicyError
from keras_qx.engine.sensitivity import SensitivityReport, quantizable_layers, sensitivity
from keras_qx.rewrite.keras3 import as_tf_keras

__all__ = ["Allocation", "InfeasibleBudget", "allocate", "auto_policy", "find_ties", "budget_from",
           "parse_budget", "legacy_budget", "BUDGET_HELP", "layer_options", "choice_units", "check_keep"]


class InfeasibleBudget(PolicyError):
    """No assignment of the candidate bit widths fits the budget; ``minimum_bytes`` would."""

    def __init__(self, message: str, budget_bytes: int, minimum_bytes: int):
        super().__init__(message)
        self.budget_bytes, self.minimum_bytes = budget_bytes, minimum_bytes


@dataclass
class Allocation:
    bits: dict  # {layer: bits}
    kernel_bytes: int
    damage: float
    budget_bytes: int
    resolution_bytes: int = 0  # 0: exact; else at least as good as the optimum at budget - this


def choice_units(options: Mapping[str, Mapping], ties: Iterable[Sequence[str]] = ()) -> list[tuple[list, list]]:
    """The units one choice is made for: ``[(layer names, widths they share)]``, tied groups
    first (names not in ``options`` dropped), then every other layer alone."""
    units, seen = [], set()
    for group in ties:
        group = [n for n in group if n in options and n not in seen]
        if group:
            common = set.intersection(*(set(options[n]) for n in group))
            if not common:
                raise PolicyError(f"tied layers {group} have no bit width in common.")
            units.append((group, sorted(common)))
            seen.update(group)
    return units + [([n], sorted(options[n])) for n in options if n not in seen]


def check_keep(layers, keep: Sequence[str]) -> list[str]:
    """``keep`` as a list, after checking it names quantizable layers of the model."""
    names = [l.name for l in layers]
    if isinstance(keep, str) or not isinstance(keep, (list, tuple, set, frozenset)):
        raise PolicyError(f"keep must be a list of layer names, e.g. keep=[{keep!r}], got {type(keep).__name__} "
                          f"{keep!r}.")
    unknown = [n for n in keep if n not in names]
    if unknown:
        raise PolicyError(f"keep names layer(s) {unknown} that are not quantizable layers of the model: {names}.")
    return list(keep)


def allocate(options: Mapping[str, Mapping[int, tuple]], budget_bytes: int,
             ties: Iterable[Sequence[str]] = (), max_states: int = 100_000, size: str = "kernel") -> Allocation:
    """Choose one bit width per layer minimising damage with total bytes <= budget.

    Args:
        options: ``{layer: {bits: (bytes, damage)}}``.
        ties: groups of layers that must share one bit width.
        size: what the bytes are ("kernel" or "gzip"), for the messages.
    """
    units = choice_units(options, ties)
    unit_options = [sorted((sum(options[n][b][0] for n in group), sum(options[n][b][1] for n in group), b)
                           for b in widths) for group, widths in units]

    resolution = 0
    # frontier: list of (cost, damage, choices tuple), cost ascending, damage strictly descending
    frontier = [(0, 0.0, ())]
    for opts in unit_options:
        merged = sorted((c + oc, d + od, ch + (b,)) for c, d, ch in frontier for oc, od, b in opts
                        if c + oc <= budget_bytes)
        frontier, best = [], math.inf
        for point in merged:
            if point[1] < best - 1e-15:
                frontier.append(point)
                best = point[1]
        if len(frontier) > max_states:
            # Keep each bucket's cheapest point (feasibility) and its least damaging (quality).
            # Swapping a dropped point for its bucket's least damaging one costs < bucket bytes
            # more, and the swaps of successive thinnings add up: the result is at least as good
            # as the exact optimum under budget - resolution (one bucket per thinning).
            bucket = math.ceil(budget_bytes / max_states)
            resolution += bucket
            ends = {}
            for point in frontier:
                key = point[0] // bucket
                ends[key] = (ends.get(key, (point,))[0], point)
            frontier = sorted({p for pair in ends.values() for p in pair})
        if not frontier:
            minimum = sum(min(o[0] for o in opts) for opts in unit_options)
            raise InfeasibleBudget(
                f"no allocation fits {budget_bytes:,} {SIZE_UNITS[size]}: the smallest possible at these "
                f"candidates is {minimum:,} bytes (the narrowest packing the TFLite exporter stores). "
                "Raise the budget, or keep fewer layers at 8 bits.",
                budget_bytes, minimum)
    cost, damage, choices = min(frontier, key=lambda p: (p[1], p[0]))
    bits = {n: b for (group, _), b in zip(units, choices) for n in group}
    return Allocation({n: bits[n] for n in options}, cost, damage, budget_bytes, resolution)


def layer_options(layer, report: SensitivityReport, only: int | None = None, size: str = "kernel") -> dict:
    """``{bits: (kernel bytes, damage)}`` for one layer (``size="gzip"``: predicted gzip'd kernel bytes).

    Damage is made monotone (fewer bits never damage less: a lower measurement is noise) and
    non-negative, and a width is dropped when more bits cost no more bytes (2- and 3-bit
    kernels are stored as INT4, so 4 bits dominates them; kinds the exporter cannot store
    below 8 bits only keep 8).
    """
    measured = report.damage[layer.name]
    bits_all = sorted({*report.candidates, 8} if only is None else {only})
    damage, worst = {}, 0.0
    for b in sorted(bits_all, reverse=True):
        worst = max(worst, measured.get(b, 0.0))
        # A measured difference of zero says "below the noise", not "free": on ties, the
        # 1e-9 per missing bit makes the allocation spend budget it has on more bits.
        damage[b] = worst + 1e-9 * (8 - b)
    options, costs = {}, {b: layer_size(layer, b, size) for b in bits_all}
    for b in bits_all:
        cost = costs[b]
        if any(b2 > b and costs[b2] <= cost for b2 in bits_all):
            continue
        options[b] = (cost, damage[b])
    return options


def find_ties(model) -> list[list[str]]:
    """Depthwise + pointwise pairs (DepthwiseConv2D -> [BN/ReLU/Activation] -> 1x1 Conv2D):
    one separable convolution, given one bit width."""
    passthrough = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation)
    ties = []
    for layer in model.layers:
        if not (isinstance(layer, keras.layers.Conv2D) and kernel_kind(layer).layer_type is keras.layers.Conv2D
                and tuple(layer.kernel_size) == (1, 1)):
            continue
        node = layer
        while True:
            inbound = inbound_layers(node)
            if len(inbound) != 1:
                break
            inbound = inbound[0]
            if isinstance(inbound, keras.layers.DepthwiseConv2D):
                ties.append([inbound.name, layer.name])
                break
            if not isinstance(inbound, passthrough):
                break
            node = inbound
    return ties


BUDGET_HELP = ("bytes (an int such as 60000, or \"60kB\"), a fraction of the uniform-int8 kernel bytes "
               "(\"0.6x\") or an average width (\"4.5bits\")")


def parse_budget(value, name: str = "budget") -> tuple[str, float]:
    """The one budget syntax of keras_qx, checked before any work is done.

    ``("bytes", n)`` from an int or ``"60000"``/``"60kB"``/``"1.2MB"`` (decimal); ``("int8", f)``
    from ``"0.6x"`` (a fraction of the uniform-int8 kernel bytes); ``("bits", b)`` from
    ``"4.5bits"`` (average weight bits). A bare float is refused: ``0.6`` could mean either.

    Example:
        >>> parse_budget("0.6x"), parse_budget(60000), parse_budget("4bits")
        (('int8', 0.6), ('bytes', 60000), ('bits', 4.0))
    """
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("bytes", "int8", "bits"):
        return value  # already parsed
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name}={value!r} is ambiguous: write {name}=\"{value:g}x\" for a fraction of the "
                         f"uniform-int8 kernel bytes, or an int for bytes.")
    text = str(value).strip().lower().replace(" ", "").replace("_", "")
    if isinstance(value, str) and text.endswith("ms"):
        raise ValueError(f"{name}={value!r}: a latency budget is not supported by this release; give {BUDGET_HELP}.")
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        if text.endswith("x"):
            fraction = float(text[:-1])
            if not 0 < fraction <= 4:
                raise ValueError
            return "int8", fraction
        for suffix in ("bits", "bit"):
            if text.endswith(suffix):
                bits = float(text[:-len(suffix)])
                if not 1 <= bits <= 32:
                    raise ValueError
                return "bits", bits
        scale = 1
        for suffix, factor in (("kb", 1000), ("mb", 1000**2), ("gb", 1000**3), ("b", 1)):
            if text.endswith(suffix):
                text, scale = text[:-len(suffix)], factor
                break
        number = float(text) * scale
        if not 1 <= number <= 2**53:
            raise ValueError
        return "bytes", int(number)
    except ValueError:
        raise ValueError(f"{name} must be {BUDGET_HELP}, got {value!r}.") from None


def legacy_budget(where: str, budget=None, budget_bytes=None, compression=None, avg_bits=None):
    """``budget`` from it or from the deprecated ``budget_bytes`` / ``compression`` / ``avg_bits``
    (compression c against float32 is exactly an average of 32/c bits)."""
    given = [k for k, v in (("budget", budget), ("budget_bytes", budget_bytes), ("compression", compression),
                            ("avg_bits", avg_bits)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"{where}: give one budget, got {given}; write them all as budget= ({BUDGET_HELP}).")
    if budget_bytes is not None:
        warn_renamed(where, "budget_bytes=", "budget=", stacklevel=4)
        return budget_bytes
    if compression is not None:
        if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not 1 <= compression <= 1e6:
            raise ValueError(f"compression must be a ratio >= 1 (float32 kernel bytes / budget), got {compression!r}.")
        warn_renamed(where, "compression=", f"budget=\"{32 / compression:g}bits\"", stacklevel=4)
        return ("bits", 32 / compression)
    if avg_bits is not None:
        if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not 1 <= avg_bits <= 32:
            raise ValueError(f"avg_bits must be a number of bits in 1..32, got {avg_bits!r}.")
        warn_renamed(where, "avg_bits=", f"budget=\"{avg_bits:g}bits\"", stacklevel=4)
        return ("bits", float(avg_bits))
    return budget


def budget_from(layers, budget, size: str = "kernel") -> int:
    """The budget in bytes of ``size`` (``"kernel"``: kernel bytes as stored; ``"gzip"``: their
    predicted gzip'd bytes) from any :func:`parse_budget` form.

    ``"0.6x"`` is 0.6 of the uniform-int8 model's bytes in that size; ``"4bits"`` is
    ``params * 4 / 8`` kernel bytes (gzip: half the gzip'd int8 bytes); an int is bytes.

    Example:
        >>> budget_from(layers, "0.3x", size="gzip")       # doctest: +SKIP
    """
    check_size(size)
    if budget is None:
        raise ValueError(f"a budget is needed: {BUDGET_HELP}.")
    unit, amount = parse_budget(budget)
    if unit == "bytes":
        return int(amount)
    if unit == "int8":
        return int(amount * total_size(layers, 8, size))
    if size == "gzip":  # relative to the gzip'd int8 model: 8 bits is 1x its bytes
        return int(total_size(layers, 8, size) * amount / 8)
    return int(sum(kernel_params(l) for l in layers) * amount / 8)


def auto_policy(model, x=None, y=None, *, budget=None, candidates=(2, 4, 8), keep: Sequence[str] = (),
                ties="auto", method: str = "loss", report: SensitivityReport | None = None, verbose: int = 1,
                size: str = "kernel", data=None, budget_bytes=None, compression=None, avg_bits=None,
                **sensitivity_kwargs) -> Policy:
    """The per-layer weight bits that lose least (by ``qx.sensitivity``) within a size budget.

    Args:
        model: the float model (a Keras 3 one of standard layers is rebuilt as tf_keras, once).
        x, y: samples and targets for the sensitivity, as ``Model.fit`` takes them (not needed
            for method "sqnr" or when ``report`` is given).
        budget: bytes (``60000``, ``"60kB"``), ``"0.6x"`` of the uniform-int8 kernel bytes, or
            ``"4.5bits"`` on average; on kernel bytes in the exported file (the shared cost
            model: INT4 packed where the exporter packs) or their gzip'd bytes (``size``).
        candidates: bit widths to choose from; keep: layer names held at 8 bits.
        ties: "auto" (depthwise+pointwise pairs), or a list of name groups, or ().
        verbose: 0 silent, 1 the sensitivity's progress bar.
        size: "kernel" (kernel bytes as stored) or "gzip" (their predicted gzip'd bytes, what a
            download costs: low-bit kernels compress far below their stored width); the
            budget and ``meta`` are in that size.
        data, budget_bytes, compression, avg_bits: deprecated (``x, y`` and ``budget``).

    Returns:
        A :class:`Policy` with a ``layers`` entry per quantizable layer and the reasoning in
        ``policy.meta["auto_policy"]``.

    Example:
        >>> policy = qx.auto_policy(model, x_train, y_train, budget="0.6x")   # doctest: +SKIP
    """
    budget = legacy_budget("qx.auto_policy()", budget, budget_bytes, compression, avg_bits)
    if budget is None:
        raise ValueError(f"qx.auto_policy() needs budget=: {BUDGET_HELP}.")
    parse_budget(budget)  # a bad budget fails before the sensitivity runs
    verbose = check_verbose(verbose, "qx.auto_policy()")
    check_size(size)
    model = as_tf_keras(model)
    layers = quantizable_layers(model)
    budget = budget_from(layers, budget, size=size)
    keep = check_keep(layers, keep)
    names = [l.name for l in layers]
    if report is None:
        x, y = legacy_xy("qx.auto_policy()", x, y, len(model.inputs), data)
        report = sensitivity(model, x, y, candidates, method=method, verbose=verbose, **sensitivity_kwargs)
    elif not isinstance(report, SensitivityReport):
        raise TypeError(f"report must be the SensitivityReport qx.sensitivity(model, data) returns, got "
                        f"{type(report).__name__}.")
    missing = [n for n in names if n not in report.damage]
    if missing:
        raise ValueError(f"the sensitivity report lacks layer(s) {missing}; it was made for another model.")
    options = {n: layer_options(l, report, 8 if n in keep else None, size) for n, l in zip(names, layers)}
    tie_groups = find_ties(model) if ties == "auto" else list(ties or [])
    result = allocate(options, budget, tie_groups, size=size)
    int8 = total_size(layers, 8, size)
    meta = {
        "size": size, "method": report.method, "candidates": list(report.candidates), "budget_bytes": budget,
        "predicted_kernel_bytes": result.kernel_bytes, "int8_kernel_bytes": int8,
        "predicted_damage": result.damage, "resolution_bytes": result.resolution_bytes,
        "ties": tie_groups, "keep": list(keep),
        "layers": {n: {"bits": b, "kernel_bytes": options[n][b][0], "damage": report.damage[n].get(b)}
                   for n, b in result.bits.items()},
    }
    return Policy.from_bits(result.bits, meta={"auto_policy": meta})
