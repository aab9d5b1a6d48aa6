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

With a latency budget (``"2ms"``, or ``["0.6x", "2ms"]`` for both caps) each width also costs
its layer's predicted microseconds from a :class:`~keras_qx.engine.latency.LatencyTable`, and the
knapsack has two constraints: it is solved exactly as a 0/1 integer program with
``scipy.optimize.milp`` (:func:`allocate_milp`).

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
from keras_qx.quant.cost import (SIZE_UNITS, check_size, kernel_bytes, kernel_gzip_bytes, kernel_params, layer_size,
                               storage_bits, total_size)
from keras_qx.quant.policy import Policy, PolicyError
from keras_qx.engine.sensitivity import SensitivityReport, quantizable_layers, sensitivity
from keras_qx.rewrite.keras3 import as_tf_keras

__all__ = ["Allocation", "InfeasibleBudget", "allocate", "allocate_milp", "auto_policy", "find_ties", "budget_from",
           "parse_budget", "split_budget", "join_budget", "budget_label", "legacy_budget", "BUDGET_HELP", "layer_options",
           "choice_units", "check_keep", "check_latency_table"]


class InfeasibleBudget(PolicyError):
    """No assignment of the candidate bit widths fits the budget; ``minimum_bytes`` would (and,
    for a latency budget, ``minimum_us`` is the fastest possible predicted time)."""

    def __init__(self, message: str, budget_bytes: int | None, minimum_bytes: int,
                 budget_us: float | None = None, minimum_us: float | None = None):
        super().__init__(message)
        self.budget_bytes, self.minimum_bytes = budget_bytes, minimum_bytes
        self.budget_us, self.minimum_us = budget_us, minimum_us


@dataclass
class Allocation:
    bits: dict  # {layer: bits}
    kernel_bytes: int
    damage: float
    budget_bytes: int
    resolution_bytes: int = 0  # 0: exact; else at least as good as the optimum at budget - this
    latency_us: float | None = None  # predicted time (base_us + the layers'), where options have times
    budget_us: float | None = None


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


def allocate(options: Mapping[str, Mapping[int, tuple]], budget_bytes: int | None,
             ties: Iterable[Sequence[str]] = (), max_states: int = 100_000, size: str = "kernel", *,
             budget_us: float | None = None, base_us: float = 0.0) -> Allocation:
    """Choose one bit width per layer minimising damage with total bytes <= budget (and, with
    ``budget_us``, predicted microseconds ``base_us + sum of the layers' times`` <= ``budget_us``).

    Args:
        options: ``{layer: {bits: (bytes, damage)}}``, or ``(bytes, damage, microseconds)``
            with a latency budget.
        budget_bytes: the bytes cap; None for none (a latency budget alone).
        ties: groups of layers that must share one bit width.
        size: what the bytes are ("kernel" or "gzip"), for the messages.
        budget_us, base_us: the latency cap and the time of the ops no layer owns.

    A bytes cap alone is solved by the exact Pareto-frontier DP; with a latency cap the problem
    is a multiple-choice knapsack with two constraints, solved exactly as a 0/1 integer program
    (:func:`allocate_milp`).
    """
    if budget_us is not None:
        return allocate_milp(options, budget_bytes, budget_us, base_us, ties, size)
    if budget_bytes is None:
        raise ValueError(f"allocate() needs a budget: {BUDGET_HELP}.")
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
    bits = {n: bits[n] for n in options}
    return Allocation(bits, cost, damage, budget_bytes, resolution, _predicted_us(options, bits, base_us))


def _predicted_us(options, bits, base_us):
    """``base_us`` plus the chosen widths' times, or None where the options carry no times."""
    if not all(len(options[n][b]) > 2 for n, b in bits.items()):
        return None
    return float(base_us + sum(options[n][b][2] for n, b in bits.items()))


def allocate_milp(options: Mapping[str, Mapping[int, tuple]], budget_bytes: int | None, budget_us: float,
                  base_us: float = 0.0, ties: Iterable[Sequence[str]] = (), size: str = "kernel") -> Allocation:
    """The exact allocation under a bytes cap (or none) and a latency cap.

    One binary variable per (unit, width) — a unit is a layer or a tied group sharing one
    width, as in :func:`choice_units` —, one width per unit, the summed bytes <= ``budget_bytes``,
    the summed layer times <= ``budget_us - base_us``; minimise the summed damage. Solved by
    ``scipy.optimize.milp`` (HiGHS branch and bound) with no relative gap: the optimum, up to
    HiGHS's absolute gap (1e-6 on the objective, which is scaled here so that this is 1e-9 of
    the largest damage difference between two widths of a unit). The answer is checked in
    exact arithmetic: bytes are integers and must fit exactly; a solution the solver's
    tolerance let past a cap is re-solved under a cap tightened by the excess.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    units = choice_units(options, ties)
    rows = []  # (unit index, bits, bytes, us, damage)
    for i, (group, widths) in enumerate(units):
        for b in widths:
            missing = [n for n in group if len(options[n][b]) < 3]
            if missing:
                raise ValueError(f"allocate(): a latency budget needs a time for every option; layer(s) {missing} "
                                 f"have none at {b} bits.")
            rows.append((i, b, sum(int(options[n][b][0]) for n in group),
                         sum(float(options[n][b][2]) for n in group), sum(float(options[n][b][1]) for n in group)))
    by_unit = [[r for r in rows if r[0] == i] for i in range(len(units))]
    fastest = base_us + sum(min(r[3] for r in opts) for opts in by_unit)
    smallest = sum(min(r[2] for r in opts) for opts in by_unit)
    cap_us = float(budget_us) - float(base_us)
    unit = SIZE_UNITS[size]

    def infeasible():  # InfeasibleBudget's arguments
        fast = [min(opts, key=lambda r: (r[3], r[2])) for opts in by_unit]
        small = [min(opts, key=lambda r: (r[2], r[3])) for opts in by_unit]
        fast_bytes, small_us = sum(r[2] for r in fast), base_us + sum(r[3] for r in small)
        if fastest > budget_us:
            text = (f"no allocation fits {budget_us:,.1f} µs: the fastest possible at these candidates is "
                    f"{fastest:,.1f} µs ({base_us:,.1f} µs of it in ops no quantizable layer owns; "
                    f"{fast_bytes:,} {unit})")
            fix = ("Raise the latency budget, run with more threads (a new latency table), or offer the "
                   "widths that run fastest on this runtime as candidates.")
        else:
            text = (f"no allocation fits both {budget_bytes:,} {unit} and {budget_us:,.1f} µs: the fastest "
                    f"possible is {fastest:,.1f} µs at {fast_bytes:,} {unit}, the smallest {smallest:,} {unit} "
                    f"at {small_us:,.1f} µs")
            fix = "Raise one of the two budgets."
        if budget_bytes is not None and smallest > budget_bytes:
            text += f"; and {budget_bytes:,} {unit} is below the smallest possible, {smallest:,}"
        return f"{text}. {fix}", budget_bytes, smallest, float(budget_us), float(fastest)

    if fastest > budget_us * (1 + 1e-12) or (budget_bytes is not None and smallest > budget_bytes):
        raise InfeasibleBudget(*infeasible())
    n, m = len(rows), len(units)
    # damage relative to each unit's least damaging width (a constant shift), scaled to [0, 1000]
    low = [min(r[4] for r in opts) for opts in by_unit]
    c = np.array([r[4] - low[r[0]] for r in rows])
    scale = 1000.0 / c.max() if c.max() > 0 else 1.0
    pick = np.zeros((m, n))
    for j, r in enumerate(rows):
        pick[r[0], j] = 1.0
    us = np.array([r[3] for r in rows])
    nbytes = np.array([r[2] for r in rows], dtype=float)
    caps_us, caps_bytes = cap_us, None if budget_bytes is None else float(budget_bytes)
    for _ in range(8):
        constraints = [LinearConstraint(pick, 1, 1), LinearConstraint(us[None, :], -np.inf, caps_us)]
        if caps_bytes is not None:
            constraints.append(LinearConstraint(nbytes[None, :], -np.inf, caps_bytes))
        result = milp(c * scale, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                      options={"mip_rel_gap": 0.0})
        if result.x is None:
            raise InfeasibleBudget(*infeasible())
        chosen = [rows[j] for j in range(n) if result.x[j] > 0.5]
        total_bytes, total_us = sum(r[2] for r in chosen), sum(r[3] for r in chosen)
        over_bytes = budget_bytes is not None and total_bytes > budget_bytes
        over_us = total_us > cap_us + 1e-9 * max(1.0, abs(cap_us))
        if len(chosen) == m and not over_bytes and not over_us:
            break
        if over_bytes:
            caps_bytes -= total_bytes - budget_bytes
        if over_us:
            caps_us -= total_us - cap_us
    else:
        raise RuntimeError("allocate_milp: the solver's answers kept missing the caps; please report this.")
    choice = {r[0]: r[1] for r in chosen}
    bits = {name: choice[i] for i, (group, _) in enumerate(units) for name in group}
    bits = {name: bits[name] for name in options}
    damage = float(sum(r[4] for r in chosen))
    return Allocation(bits, int(total_bytes), damage, budget_bytes, 0, float(base_us + total_us), float(budget_us))


def layer_options(layer, report: SensitivityReport, only: int | None = None, size: str = "kernel",
                  latency=None, carried: bool = False) -> dict:
    """``{bits: (kernel bytes, damage)}`` for one layer (``size="gzip"``: predicted gzip'd kernel bytes);
    with ``latency`` (a :class:`~keras_qx.engine.latency.LatencyTable`), ``(bytes, damage, µs)``.

    Damage is made monotone (fewer bits never damage less: a lower measurement is noise) and
    non-negative, and a width is dropped when more bits cost no more bytes (2- and 3-bit
    kernels are stored as INT4, so 4 bits dominates them; kinds the exporter cannot store
    below 8 bits only keep 8) — with a latency table, and no more time.
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
    times = None
    if latency is not None:
        row = latency.layers.get(layer.name, {})
        times = {b: float(row[b]) if b in row else math.inf for b in bits_all}
    for b in bits_all:
        cost = costs[b]
        if any(b2 > b and costs[b2] <= cost and (times is None or times[b2] <= times[b]) for b2 in bits_all):
            continue
        if times is None:
            options[b] = (cost, damage[b])
        elif math.isfinite(times[b]):
            options[b] = (cost, damage[b], times[b])
        else:
            raise ValueError(f"the latency table has no time for layer {layer.name!r} at {b} bits (it has "
                             f"{sorted(latency.layers.get(layer.name, {}), key=str)}); measure it for this model "
                             f"and candidates: latency_table(model, candidates={tuple(report.candidates)}).")
    if carried and times is not None and math.isfinite(times[8]):
        # -b: b-bit values on an int8 carrier (the policy's "pack": false): b bits' damage, int8's
        # time, and (gzip'd) bytes of b-bit values; kept where nothing else is as good in all three
        for b in bits_all:
            if b < 8 and storage_bits(layer, b) < 8:
                option = (kernel_gzip_bytes(layer, b, pack=False) if size == "gzip" else kernel_bytes(layer, b, False),
                          damage[b], times[8])
                if not any(all(o[i] <= option[i] for i in range(3)) for o in options.values()):
                    options[-b] = option
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
               "(\"0.6x\"), an average width (\"4.5bits\"), a latency (\"2ms\", \"500us\"), or a list of one "
               "size and one latency budget ([\"0.6x\", \"2ms\"])")
UNITS = ("bytes", "int8", "bits", "us")


def _is_parsed(value) -> bool:
    return (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and value[0] in UNITS
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool))


def parse_budget(value, name: str = "budget"):
    """The one budget syntax of keras_qx, checked before any work is done.

    ``("bytes", n)`` from an int or ``"60000"``/``"60kB"``/``"1.2MB"`` (decimal); ``("int8", f)``
    from ``"0.6x"`` (a fraction of the uniform-int8 kernel bytes); ``("bits", b)`` from
    ``"4.5bits"`` (average weight bits); ``("us", t)`` from ``"2ms"``, ``"500us"`` or ``"500µs"``
    (predicted latency, microseconds). A list or tuple of one size budget and one latency
    budget (``["0.6x", "2ms"]``, or the string ``"0.6x,2ms"``) gives the pair of their parsed
    forms. A bare float is refused: ``0.6`` could mean either.

    Example:
        >>> parse_budget("0.6x"), parse_budget(60000), parse_budget("4bits"), parse_budget("2ms")
        (('int8', 0.6), ('bytes', 60000), ('bits', 4.0), ('us', 2000.0))
        >>> parse_budget(["40kB", "500us"])
        (('bytes', 40000), ('us', 500.0))
    """
    if _is_parsed(value):
        return value  # already parsed
    given = value
    if isinstance(value, str) and "," in value:  # the CLI's form: "0.6x,2ms"
        value = value.split(",")
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be {BUDGET_HELP}, got {given!r}.")
        parts = tuple(_parse_one(v, name) for v in value)
        kinds = ["latency" if p[0] == "us" else "size" for p in parts]
        if kinds[0] == kinds[1]:
            raise ValueError(f"{name}={given!r} gives two {kinds[0]} budgets; a list holds one size budget and "
                             f"one latency budget, e.g. [\"0.6x\", \"2ms\"].")
        return parts
    return _parse_one(value, name)


def _parse_one(value, name):
    if _is_parsed(value):
        return value
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name}={value!r} is ambiguous: write {name}=\"{value:g}x\" for a fraction of the "
                         f"uniform-int8 kernel bytes, or an int for bytes.")
    text = str(value).strip().lower().replace(" ", "").replace("_", "")
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        for suffix, factor in (("ms", 1000.0), ("us", 1.0), ("µs", 1.0), ("μs", 1.0)):
            if isinstance(value, str) and text.endswith(suffix):
                try:
                    us = float(text[:-len(suffix)]) * factor
                except ValueError:
                    us = math.nan
                if not (math.isfinite(us) and us > 0):
                    raise ValueError(f"{name}={value!r}: a latency budget must be a positive, finite time such as "
                                     "\"2ms\" or \"500us\".")
                return "us", us
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
    except ValueError as err:
        if str(err).startswith(f"{name}="):
            raise
        raise ValueError(f"{name} must be {BUDGET_HELP}, got {value!r}.") from None


def split_budget(value, name: str = "budget") -> tuple:
    """``(size budget, latency µs)`` of any :func:`parse_budget` form, either None where absent:
    the size budget in its parsed form (``("int8", 0.6)``...), the latency in microseconds.

    Example:
        >>> split_budget(["0.6x", "2ms"]), split_budget("40kB"), split_budget("500us")
        ((('int8', 0.6), 2000.0), (('bytes', 40000), None), (None, 500.0))
    """
    parsed = parse_budget(value, name)
    parts = parsed if isinstance(parsed[0], tuple) else (parsed,)
    size = next((p for p in parts if p[0] != "us"), None)
    latency = next((float(p[1]) for p in parts if p[0] == "us"), None)
    return size, latency


def join_budget(size_bytes: int | None, budget_us: float | None):
    """The budget of a bytes cap and a latency cap (either None where absent), as
    :func:`parse_budget` reads it: ``60000``, ``("us", 2000.0)``, or a list of both.

    Example:
        >>> join_budget(60000, None), join_budget(60000, 2000.0)
        (60000, [60000, ('us', 2000.0)])
    """
    parts = [p for p in (size_bytes, None if budget_us is None else ("us", budget_us)) if p is not None]
    if not parts:
        raise ValueError(f"a budget is needed: {BUDGET_HELP}.")
    return parts[0] if len(parts) == 1 else parts


def budget_label(value) -> str:
    """A budget as text in its own syntax: ``"0.6x"``, ``"60,000 B"``, ``"2ms"``, ``"0.6x,2ms"``."""
    size, us = split_budget(value)
    parts = []
    if size is not None:
        unit, amount = size
        parts.append(f"{int(amount):,} B" if unit == "bytes" else f"{amount:g}{'x' if unit == 'int8' else 'bits'}")
    if us is not None:
        parts.append(f"{us / 1000:g}ms" if us >= 1000 else f"{us:g}us")
    return ",".join(parts)


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
    parsed, latency = split_budget(budget)
    if latency is not None:
        raise ValueError(f"budget {budget!r} has a latency part; budget_from() counts bytes: give it the size part "
                         "of split_budget(budget).")
    unit, amount = parsed
    if unit == "bytes":
        return int(amount)
    if unit == "int8":
        return int(amount * total_size(layers, 8, size))
    if size == "gzip":  # relative to the gzip'd int8 model: 8 bits is 1x its bytes
        return int(total_size(layers, 8, size) * amount / 8)
    return int(sum(kernel_params(l) for l in layers) * amount / 8)


def check_latency_table(latency, where: str):
    """``latency`` checked to be a :class:`~keras_qx.engine.latency.LatencyTable` (or None)."""
    from keras_qx.engine.latency import LatencyTable

    if latency is not None and not isinstance(latency, LatencyTable):
        raise TypeError(f"{where}: latency must be a LatencyTable (keras_qx.engine.latency.latency_table(model, "
                        f"candidates) measures one) or None, got {type(latency).__name__}.")
    return latency


def measured_latency(model, candidates, latency, where: str, x=None):
    """The latency table to plan with: ``latency`` if given, else measured by
    ``keras_qx.engine.latency.latency_table`` at the candidates (and 8 bits)."""
    check_latency_table(latency, where)
    if latency is not None:
        return latency
    from keras_qx.engine import latency as latency_module

    widths = tuple(sorted({*candidates, 8}))
    return check_latency_table(latency_module.latency_table(model, widths, x=x), where)


def auto_policy(model, x=None, y=None, *, budget=None, candidates=(2, 4, 8), keep: Sequence[str] = (),
                ties="auto", method: str = "loss", report: SensitivityReport | None = None, verbose: int = 1,
                size: str = "kernel", latency=None, data=None, budget_bytes=None, compression=None, avg_bits=None,
                **sensitivity_kwargs) -> Policy:
    """The per-layer weight bits that lose least (by ``qx.sensitivity``) within a size budget,
    a latency budget, or both.

    Args:
        model: the float model (a Keras 3 one of standard layers is rebuilt as tf_keras, once).
        x, y: samples and targets for the sensitivity, as ``Model.fit`` takes them (not needed
            for method "sqnr" or when ``report`` is given).
        budget: bytes (``60000``, ``"60kB"``), ``"0.6x"`` of the uniform-int8 kernel bytes, or
            ``"4.5bits"`` on average; on kernel bytes in the exported file (the shared cost
            model: INT4 packed where the exporter packs) or their gzip'd bytes (``size``).
            Or a predicted latency (``"2ms"``, ``"500us"``), or a list of one size and one
            latency budget (``["0.6x", "2ms"]``): both caps hold.
        candidates: bit widths to choose from; keep: layer names held at 8 bits.
        ties: "auto" (depthwise+pointwise pairs), or a list of name groups, or ().
        verbose: 0 silent, 1 the sensitivity's progress bar.
        size: "kernel" (kernel bytes as stored) or "gzip" (their predicted gzip'd bytes, what a
            download costs: low-bit kernels compress far below their stored width); the
            budget and ``meta`` are in that size.
        latency: the :class:`~keras_qx.engine.latency.LatencyTable` a latency budget is planned
            against; None measures one (``latency_table(model, candidates)``, one thread) when
            the budget has a latency part. Given without a latency budget, ``meta`` still
            records the predicted time.
        data, budget_bytes, compression, avg_bits: deprecated (``x, y`` and ``budget``).

    Returns:
        A :class:`Policy` with a ``layers`` entry per quantizable layer and the reasoning in
        ``policy.meta["auto_policy"]`` (with a latency table: ``latency_budget_us``,
        ``predicted_latency_us`` and each layer's ``latency_us``).

    Example:
        >>> policy = qx.auto_policy(model, x_train, y_train, budget="0.6x")   # doctest: +SKIP
        >>> policy = qx.auto_policy(model, x_train, y_train, budget=["0.6x", "2ms"])   # doctest: +SKIP
    """
    budget = legacy_budget("qx.auto_policy()", budget, budget_bytes, compression, avg_bits)
    if budget is None:
        raise ValueError(f"qx.auto_policy() needs budget=: {BUDGET_HELP}.")
    size_budget, budget_us = split_budget(budget)  # a bad budget fails before the sensitivity runs
    verbose = check_verbose(verbose, "qx.auto_policy()")
    check_size(size)
    check_latency_table(latency, "qx.auto_policy()")
    model = as_tf_keras(model)
    layers = quantizable_layers(model)
    budget = None if size_budget is None else budget_from(layers, size_budget, size=size)
    keep = check_keep(layers, keep)
    names = [l.name for l in layers]
    if report is not None and not isinstance(report, SensitivityReport):
        raise TypeError(f"report must be the SensitivityReport qx.sensitivity(model, data) returns, got "
                        f"{type(report).__name__}.")
    if budget_us is not None:  # measured (if need be) before the sensitivity: a failure costs less
        latency = measured_latency(model, report.candidates if report is not None else candidates, latency,
                                   "qx.auto_policy()", x=x if x is not None else data)
    if report is None:
        x, y = legacy_xy("qx.auto_policy()", x, y, len(model.inputs), data)
        report = sensitivity(model, x, y, candidates, method=method, verbose=verbose, **sensitivity_kwargs)
    missing = [n for n in names if n not in report.damage]
    if missing:
        raise ValueError(f"the sensitivity report lacks layer(s) {missing}; it was made for another model.")
    tie_groups = find_ties(model) if ties == "auto" else list(ties or [])
    base_us = float(latency.base_us) if latency is not None else 0.0
    result, options, failure = None, None, None
    # The time is additive within a cache regime (LatencyTable.regimes): solve each under its
    # weight byte cap and keep the least damaging allocation.
    # A gzip budget with a latency cap also offers each sub-byte width on an int8 carrier (the key
    # -b; "pack": false): about the download of b-bit values at int8 speed.
    carried = size == "gzip" and budget_us is not None
    for cap, times in (latency.regimes() if budget_us is not None else [(None, None)]):
        if cap is not None and size != "kernel":
            continue  # the cap counts stored bytes: with a gzip budget, plan on the bounding regime only
        table = None if latency is None else latency if times is None else latency.with_layers(times)
        opts = {n: layer_options(l, report, 8 if n in keep else None, size, table, carried)
                for n, l in zip(names, layers)}
        cap_bytes = budget if cap is None else cap if budget is None else min(budget, cap)
        try:
            found = allocate(opts, cap_bytes, tie_groups, size=size, budget_us=budget_us, base_us=base_us)
        except InfeasibleBudget as err:
            failure = err
            continue
        if result is None or found.damage < result.damage - 1e-12:
            result, options = found, opts
    if result is None:
        raise failure
    timed = {n: 8 if b < 0 else b for n, b in result.bits.items()}  # a carried kernel runs as int8
    if latency is not None:  # the time of the chosen files by the full model, not a regime's bound
        times = latency.layer_times(timed)
        result.latency_us = float(latency.base_us + sum(times.values()))
        options = {n: {**options[n], result.bits[n]: (*options[n][result.bits[n]][:2], float(times[n]))}
                   for n in options}
    int8 = total_size(layers, 8, size)
    meta = {
        "size": size, "method": report.method, "candidates": list(report.candidates), "budget_bytes": budget,
        "predicted_kernel_bytes": result.kernel_bytes, "int8_kernel_bytes": int8,
        "predicted_damage": result.damage, "resolution_bytes": result.resolution_bytes,
        "ties": tie_groups, "keep": list(keep),
        "layers": {n: {"bits": abs(b), "kernel_bytes": options[n][b][0], "damage": report.damage[n].get(abs(b)),
                       **({"pack": False} if b < 0 else {})}
                   for n, b in result.bits.items()},
    }
    if latency is not None:
        meta.update({"latency_budget_us": budget_us, "predicted_latency_us": result.latency_us,
                     "latency_base_us": base_us, "latency_runtime": latency.runtime,
                     "latency_num_threads": latency.num_threads})
        for n, b in result.bits.items():
            meta["layers"][n]["latency_us"] = options[n][b][2]
    if any(b < 0 for b in result.bits.values()):
        return Policy(layers={n: {"weight_bits": abs(b), **({"pack": False} if b < 0 else {})}
                              for n, b in result.bits.items()}, meta={"auto_policy": meta})
    return Policy.from_bits(result.bits, meta={"auto_policy": meta})
