"""The benchmark sweep (`bench/pareto.py`): does ``auto_policy`` beat random bit mixes and uniform bits at the same size?

One sensitivity report is computed and reused; for each size budget the auto policy and
``random_mixes`` random per-layer assignments of the same (cost-model) size, plus each
uniform weight width, are quantized, QAT-trained, exported to TFLite and evaluated. Every
row records the kernel bytes really stored in the file next to the cost model's prediction.

Example:
    >>> from keras_qx.engine.pareto import pareto
    >>> result = qx.pareto(model, x_train, y_train, validation_data=(x_test, y_test))  # doctest: +SKIP
    >>> print(result.table()); result.plot("pareto.png")                               # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from keras_qx._compat import keras
from keras_qx._seed import seeded
from keras_qx._io import check_xy
from keras_qx._deprecation import check_verbose, say as say_for, warn_renamed
from keras_qx._io import legacy_xy
from keras_qx.engine.allocate import (BUDGET_HELP, InfeasibleBudget, auto_policy, budget_from, budget_label, check_keep,
                                      check_latency_table, choice_units, find_ties, layer_options, measured_latency,
                                      join_budget, split_budget, _predicted_us)
from keras_qx.quant.cost import SIZE_UNITS, check_size, layer_size, total_size
from keras_qx.lite.evaluate import evaluate_tflite
from keras_qx.lite.export import ExportError, export_tflite
from keras_qx.quant.policy import Policy
from keras_qx.qat.calibrate import calibrate
from keras_qx.qat.quantize import quantize
from keras_qx.quant.quantizers import WEIGHT_BITS, check_bits
from keras_qx.engine.sensitivity import SensitivityReport, infer_loss, quantizable_layers, sensitivity

__all__ = ["pareto", "ParetoResult"]

WINDOW = 0.85  # random mixes aim for [WINDOW * budget, budget] kernel bytes
MAX_TRIES = 2000  # rejection-sampling draws per random mix
BATCH = 64
LATENCY_RUNS = 20
CALIBRATION = 500  # samples that set each variant's activation ranges before QAT


def _budget_label(budget) -> str:
    return budget if isinstance(budget, str) else f"{budget:,} B"


def _check_budgets(budgets) -> list:
    """Budgets in the one budget syntax (``"0.75x"``, bytes, ``"4bits"``); the old bare fractions
    (0 < f < 1) still work, with a DeprecationWarning."""
    if isinstance(budgets, (int, float, str)) or not isinstance(budgets, (tuple, list)) or not budgets:
        raise ValueError(f"budgets must be a non-empty tuple of budgets ({BUDGET_HELP}), got {budgets!r}.")
    out = []
    for b in budgets:
        if isinstance(b, (float, np.floating)) and 0 < b < 1:
            warn_renamed("qx.pareto()", f"budgets fraction {float(b)!r}", f"\"{float(b):g}x\"")
            b = f"{float(b):g}x"
        if isinstance(b, np.integer):
            b = int(b)
        size, us = split_budget(b, "budget")
        if us is not None:  # a latency budget, alone or with a size: its label ("1ms", "0.6x,1ms")
            out.append(budget_label(b))
            continue
        unit, amount = size
        out.append(int(amount) if unit == "bytes" else f"{amount:g}{'x' if unit == 'int8' else 'bits'}")
    dupes = sorted({b for b in out if out.count(b) > 1}, key=str)
    if dupes:
        raise ValueError(f"budgets {dupes} are given more than once.")
    return out


@dataclass
class ParetoResult:
    """Rows (one per trained variant) and budgets that were skipped, with why."""

    rows: list
    skipped: list  # [(budget, reason)]
    int8_kernel_bytes: int
    method: str
    seconds: float
    report: SensitivityReport | None = field(default=None, repr=False)
    size: str = "kernel"  # what budgets count (int8_kernel_bytes too): "kernel" or "gzip"

    def _by_budget(self):
        budgets = []
        for r in self.rows:
            if r["kind"] != "uniform" and r["budget"] not in budgets:
                budgets.append(r["budget"])
        return budgets

    @property
    def _key(self) -> str:
        """The row entry budgets compare with: the file's kernel bytes, or the predicted gzip'd ones."""
        return "kernel_bytes" if self.size == "kernel" else "predicted_kernel_bytes"

    def summary_lines(self) -> list[str]:
        """Per budget: auto accuracy vs the random mixes and the uniform widths that fit."""
        lines = []
        uniform = [r for r in self.rows if r["kind"] == "uniform"]
        for budget in self._by_budget():
            rows = [r for r in self.rows if r["kind"] != "uniform" and r["budget"] == budget]
            auto = next((r for r in rows if r["kind"] == "auto"), None)
            cap, cap_us = rows[0]["budget_bytes"], rows[0].get("budget_us")
            caps = ([f"{cap:,} B"] if cap is not None else []) + ([f"{cap_us:,.1f} µs"] if cap_us is not None else [])
            parts = [f"**{_budget_label(budget)}** ({', '.join(caps)}):"]
            if auto is not None:
                parts.append(f"auto {auto['accuracy']:.2%} ({auto[self._key]:,} B)")
            rand = [r["accuracy"] for r in rows if r["kind"] == "random"]
            if rand:
                delta = f"; auto {auto['accuracy'] - np.mean(rand):+.2%} vs mean" if auto else ""
                parts.append(f"| random (n={len(rand)}) mean {np.mean(rand):.2%}, min {min(rand):.2%}, "
                             f"max {max(rand):.2%}{delta}")
            fits = [r for r in uniform if (cap is None or r[self._key] <= cap)
                    and (cap_us is None or (r["predicted_us"] is not None and r["predicted_us"] <= cap_us))]
            if fits:
                parts.append("| uniform within budget: " + ", ".join(
                    f"{r['label']} {r['accuracy']:.2%} ({r[self._key]:,} B)" for r in fits))
            else:
                parts.append("| no uniform width fits")
            if auto is not None:
                parts.append(self._verdict(auto, [r for r in rows if r["kind"] == "random"], fits))
            lines.append("- " + " ".join(parts))
        for budget, reason in self.skipped:
            where = "uniform" if budget is None else _budget_label(budget)
            lines.append(f"- **{where}** skipped: {reason}")
        return lines

    @staticmethod
    def _verdict(auto, random_rows, uniform_rows) -> str:
        """Does auto beat the best uniform width that fits and the random mean by more than the
        seed spread (the largest max - min over seeds among the variants compared)?"""
        compared = [auto, *random_rows, *uniform_rows]
        spread = max(max(r["accuracies"]) - min(r["accuracies"]) for r in compared)
        margins = []
        if uniform_rows:
            margins.append(("best uniform", auto["accuracy"] - max(r["accuracy"] for r in uniform_rows)))
        if random_rows:
            margins.append(("random mean", auto["accuracy"] - float(np.mean([r["accuracy"] for r in random_rows]))))
        if not margins:
            return ""
        beats = all(m > spread for _, m in margins)
        return (f"| margin vs {', '.join(f'{n} {m:+.2%}' for n, m in margins)}; seed spread {spread:.2%} "
                f"(n={len(auto['accuracies'])}): {'auto wins by more than the spread' if beats else 'not beyond the spread'}")

    def table(self, print_fn=None) -> str:
        """Markdown table of the rows, then the per-budget summary (a string; print it yourself)."""
        timed = any(r.get("predicted_us") is not None for r in self.rows)
        out = ["| variant | budget | kernel bytes | file bytes | gzip bytes |" + (" predicted µs |" if timed else "")
               + " accuracy | bits |", "|---|---|---|---|---|---|---|" + ("---|" if timed else "")]
        for r in self.rows:
            budget = "—" if r["budget_bytes"] is None else f"{r['budget_bytes']:,}"
            if r.get("budget_us") is not None:
                budget = (f"{r['budget_bytes']:,}, " if r["budget_bytes"] is not None else "") + f"{r['budget_us']:,.1f} µs"
            bits = " ".join(f"{n}:{b}" for n, b in r["bits"].items())
            us = (f" {r['predicted_us']:,.1f} |" if r.get("predicted_us") is not None else " — |") if timed else ""
            out.append(f"| {r['label']} | {budget} | {r['kernel_bytes']:,} | {r['size_bytes']:,} | "
                       f"{r['gzip_bytes']:,} |{us} {r['accuracy']:.2%} | {bits} |")
        out += ["", f"Budgets are {SIZE_UNITS[self.size]} vs uniform int8 ({self.int8_kernel_bytes:,} B"
                    + ("" if self.size == "kernel" else "; predicted_kernel_bytes in to_dict() rows are gzip'd")
                    + "); "
                    f"sensitivity method {self.method!r}; {self.seconds:.0f} s.", ""]
        out += self.summary_lines()
        text = "\n".join(out)
        if print_fn is not None:
            warn_renamed("ParetoResult.table()", "print_fn=", "print(result.table())")
            print_fn(text)
        return text

    def to_dict(self) -> dict:
        return {"rows": [dict(r, bits=dict(r["bits"])) for r in self.rows],
                "skipped": [{"budget": b, "reason": reason} for b, reason in self.skipped],
                "int8_kernel_bytes": self.int8_kernel_bytes, "method": self.method, "size": self.size,
                "seconds": self.seconds,
                "sensitivity": self.report.to_dict() if self.report is not None else None}

    def plot(self, path=None, ax=None, x: str = "bytes"):
        """Accuracy vs kernel bytes (``x="bytes"``) or vs predicted latency (``x="latency"``, for a
        sweep with a latency table): auto line, uniform squares, random grey dots, budget lines."""
        from keras_qx._plot import axes, finish

        if x not in ("bytes", "latency"):
            raise ValueError(f"x must be \"bytes\" or \"latency\", got {x!r}.")
        key, cap_key = ("kernel_bytes", "budget_bytes") if x == "bytes" else ("predicted_us", "budget_us")
        rows = [r for r in self.rows if r.get(key) is not None]
        if x == "latency" and not rows:
            raise ValueError("this sweep has no predicted latencies: run qx.pareto with a latency budget "
                             "(budgets=(\"0.6x\", \"1ms\")) or latency=a LatencyTable.")
        fig, ax = axes(ax, figsize=(7, 4.5))
        import matplotlib.ticker
        rand = [r for r in rows if r["kind"] == "random"]
        if rand:
            ax.scatter([r[key] for r in rand], [100 * r["accuracy"] for r in rand], s=12,
                       color="0.6", label="random mixes", zorder=2)
        auto = sorted((r for r in rows if r["kind"] == "auto"), key=lambda r: r[key])
        if auto:
            ax.plot([r[key] for r in auto], [100 * r["accuracy"] for r in auto], "o-",
                    color="C0", label="auto_policy", zorder=3)
        uniform = [r for r in rows if r["kind"] == "uniform"]
        if uniform:
            ax.scatter([r[key] for r in uniform], [100 * r["accuracy"] for r in uniform], marker="s",
                       s=45, color="C3", label="uniform", zorder=4)
            for r in uniform:
                ax.annotate(r["label"], (r[key], 100 * r["accuracy"]), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
        caps = sorted({r[cap_key] for r in self.rows if r.get(cap_key) is not None})
        for i, cap in enumerate(caps):
            ax.axvline(cap, linestyle="--", color="0.75", linewidth=1, zorder=1,
                       label="budgets" if i == 0 else None)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("kernel bytes in the TFLite file" if x == "bytes" else "predicted latency (µs)")
        ax.set_ylabel("TFLite test accuracy (%)")
        ax.set_title(f"Accuracy vs size (int8 = {self.int8_kernel_bytes:,} kernel bytes)" if x == "bytes"
                     else "Accuracy vs predicted latency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        finish(fig, path)
        return ax


def _random_mix(rng, units, options, budget: int | None, seen: set, budget_us: float | None = None,
                base_us: float = 0.0):
    """One random assignment within ``budget``: uniformly per unit (a layer or a tied group)
    from its non-dominated widths, rejection-sampled into [WINDOW * budget, budget]. With a
    latency budget it holds too (options carry times); with a latency budget alone, the window
    is on the predicted time.

    Preference: a new assignment in the window, then one already drawn (``seen``) in the
    window, then the largest new one below it, then the largest seen one.
    Returns (bits, cost, in_window) or None if no draw fitted.
    """
    best = {}  # (in_window, new) -> (choice, cost)
    for _ in range(MAX_TRIES):
        choice = {}
        for group, widths in units:
            b = int(widths[rng.integers(len(widths))])
            choice.update({n: b for n in group})
        cost = sum(options[n][b][0] for n, b in choice.items())
        if budget is not None and cost > budget:
            continue
        window, cap = cost, budget
        if budget_us is not None:
            us = _predicted_us(options, choice, base_us)
            if us > budget_us:
                continue
            if budget is None:
                window, cap = us, budget_us  # the window on time
        cost = window
        slot = (cost >= WINDOW * cap, tuple(sorted(choice.items())) not in seen)
        if slot == (True, True):
            return choice, cost, True
        if slot not in best or cost > best[slot][1]:
            best[slot] = (choice, cost)
    for slot in ((True, False), (False, True), (False, False)):
        if slot in best:
            return (*best[slot], slot[0])
    return None


def _check_options(qat_epochs, seeds, random_mixes, uniform) -> list[int]:
    for name, value, low in (("qat_epochs", qat_epochs, 0), ("seeds", seeds, 1), ("random_mixes", random_mixes, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    if isinstance(uniform, int) or not isinstance(uniform, (tuple, list)):
        raise ValueError(f"uniform must be a tuple of weight bit widths, got {uniform!r}.")
    return [check_bits(b, "uniform weight bits", WEIGHT_BITS) for b in uniform]


def _plan(model, layers, report, budgets, uniform, keep, random_mixes, seed, say, size="kernel", latency=None):
    """Every variant to train, cheap to make: ``(plan, skipped)``; plan rows are
    ``(kind, label, budget, budget bytes, bits, policy)``."""
    names = [l.name for l in layers]
    plan = [("uniform", f"W{b}", None, (None, None), {n: b for n in names}, Policy.uniform(weight_bits=b))
            for b in uniform]
    skipped = []
    options = {n: layer_options(l, report, 8 if n in keep else None, size, latency) for n, l in zip(names, layers)}
    units = choice_units(options, find_ties(model))
    rng = np.random.default_rng(seed)
    base_us = latency.base_us if latency is not None else 0.0
    for budget in budgets:
        size_budget, cap_us = split_budget(budget)
        cap = None if size_budget is None else budget_from(layers, size_budget, size)
        label = _budget_label(budget)
        try:
            policy = auto_policy(model, report=report, budget=join_budget(cap, cap_us), keep=keep,
                                 verbose=0, size=size, latency=latency)
        except InfeasibleBudget as err:
            skipped.append((budget, str(err)))
            caps = ([f"{cap:,} {SIZE_UNITS[size]}"] if cap is not None else []) + \
                ([f"{cap_us:,.1f} µs"] if cap_us is not None else [])
            say(f"skip {label} ({', '.join(caps)}): {err}")
            continue
        auto_bits = {n: s["weight_bits"] for n, s in policy.layers.items()}
        plan.append(("auto", f"auto @ {label}", budget, (cap, cap_us), auto_bits, policy))
        seen = set()
        for i in range(random_mixes):
            found = _random_mix(rng, units, options, cap, seen, cap_us, base_us)
            if found is None:
                reason = f"random mix {i + 1}: no random assignment fits in {MAX_TRIES} draws"
                skipped.append((budget, reason))
                say(f"skip {label}: {reason}")
                break
            bits, cost, in_window = found
            seen.add(tuple(sorted(bits.items())))
            if not in_window:
                say(f"note {label}: random mix {i + 1} is {cost:,} B, below {WINDOW:.0%} of the budget")
            plan.append(("random", f"random {i + 1} @ {label}", budget, (cap, cap_us), bits, Policy.from_bits(bits)))
    return plan, skipped


def _train_and_score(model, policy, train, test, representative, qat_epochs, seeds):
    """QAT ``seeds`` times, export, score in TFLite: ``(last metrics, file kernel bytes, accuracies)``."""
    (x_train, y_train), (x_test, y_test) = train, test
    accuracies, metrics, tfl = [], None, None
    for s in seeds:
        with seeded(s):
            qat = calibrate(quantize(model, policy), x_train[:CALIBRATION])  # QAT starts from data ranges
            qat.compile(keras.optimizers.Adam(1e-4), infer_loss(model, y_train), metrics=["accuracy"])
            if qat_epochs:
                qat.fit(x_train, y_train, epochs=qat_epochs, batch_size=BATCH, verbose=0)
        tfl = export_tflite(qat, x_train[:300] if representative is None else representative)
        metrics = evaluate_tflite(tfl, x_test, y_test, latency_runs=LATENCY_RUNS)
        accuracies.append(metrics["accuracy"])
    return metrics, tfl.report.info.kernel_bytes, accuracies


def pareto(model, x=None, y=None, *, validation_data=None, budgets: Sequence = ("0.75x", "0.6x", "0.5x"),
           candidates: Sequence[int] = (2, 4, 8), method: str = "loss", qat_epochs: int = 2,
           random_mixes: int = 5, uniform: Sequence[int] = (8, 4, 2), calibration_x=None, seed: int = 0,
           keep: Sequence[str] = (), seeds: int = 1, verbose: int = 1,
           report: SensitivityReport | None = None, size: str = "kernel", latency=None,
           train_data=None, test_data=None, representative=None, print_fn=None) -> ParetoResult:
    """Sweep size budgets: auto policy vs random mixes vs uniform bits, each QAT-trained and exported.

    Args:
        model: a trained float tf_keras model.
        x, y: training data: QAT and the sensitivity use it.
        validation_data: ``(x_val, y_val)``: each row's accuracy is the TFLite file's on it.
        budgets: budgets in keras_qx's one syntax: ``"0.6x"`` of the uniform-int8 kernel bytes,
            an int of bytes, ``"4bits"`` on average. A budget below the smallest possible size
            is skipped, with the reason. A latency budget (``"1ms"``) or a pair (``("0.6x", "1ms")``)
            caps the predicted time too; the rows then have ``predicted_us`` (and ``budget_us``).
        candidates / method: for ``qx.sensitivity`` (ignored when ``report`` is given).
        qat_epochs: QAT epochs per variant (Adam 1e-4, batch 64), after ``qx.calibrate`` on
            500 training samples.
        random_mixes: random assignments per budget; uniform: weight widths of the uniform rows.
        calibration_x: export calibration samples (default ``x[:300]``).
        keep: layer names held at 8 bits by auto and random variants.
        seeds: QAT runs per variant (seeds ``seed .. seed + seeds - 1``); accuracy is their
            mean. One run's accuracy on a small test set moves by a sample or two between
            seeds, so compare variants with several. Identical bit assignments run once.
        verbose: 0 silent, 1 one progress line per variant.
        size: what budgets count: ``"kernel"`` (kernel bytes as stored) or ``"gzip"`` (their
            predicted gzip'd bytes; each row's ``predicted_kernel_bytes`` is then gzip'd too).
        latency: the :class:`~keras_qx.engine.latency.LatencyTable` latency budgets are planned
            against; None measures one (``latency_table``) when a budget has a latency part.
        train_data, test_data, representative, print_fn: deprecated names of ``(x, y)``,
            ``validation_data``, ``calibration_x`` and ``verbose``.

    Returns:
        :class:`ParetoResult`.
    """
    if train_data is None and validation_data is None and isinstance(y, tuple) and len(y) == 2 \
            and isinstance(x, tuple) and len(x) == 2:
        x, y, test_data = x, None, y  # the old positional form pareto(model, (x, y), (x_test, y_test))
    x, y = legacy_xy("qx.pareto()", x, y, data=train_data)
    if test_data is not None:
        if validation_data is not None:
            raise TypeError("qx.pareto(): give validation_data or the deprecated test_data, not both.")
        warn_renamed("qx.pareto()", "test_data=", "validation_data=")
        validation_data = test_data
    if representative is not None:
        warn_renamed("qx.pareto()", "representative=", "calibration_x=")
        calibration_x = representative
    if print_fn is not None:
        warn_renamed("qx.pareto()", "print_fn=", "verbose=")
    verbose = check_verbose(verbose, "qx.pareto()")
    if validation_data is None:
        raise ValueError("qx.pareto() needs validation_data=(x_val, y_val): each variant's file is scored there.")
    train_data, test_data, representative = (x, y), validation_data, calibration_x
    start = time.perf_counter()
    check_size(size)
    budgets = _check_budgets(budgets)
    train, test = check_xy(train_data, "x, y"), check_xy(test_data, "validation_data")
    uniform = _check_options(qat_epochs, seeds, random_mixes, uniform)
    say = say_for(verbose, print_fn)
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no Dense/Conv layers to quantize.")
    keep = check_keep(layers, keep)
    if report is None:
        say(f"sensitivity ({method}) of {len(layers)} layers...")
        report = sensitivity(model, *train, candidates, method=method, seed=seed, verbose=0)
        say(f"      done in {report.seconds:.1f}s")
    check_latency_table(latency, "qx.pareto()")
    if any(split_budget(b)[1] is not None for b in budgets):
        # the sweep adds times as it adds bytes: the table's bound for any file of the model
        latency = measured_latency(model, report.candidates, latency, "qx.pareto()", x=train[0]).additive()
    plan, skipped = _plan(model, layers, report, budgets, uniform, keep, random_mixes, seed, say, size, latency)

    rows, by_name = [], {l.name: l for l in layers}
    measured = {}  # bits -> (metrics, kernel bytes, accuracies): identical assignments run once
    for step, (kind, label, budget, (cap, cap_us), bits, policy) in enumerate(plan, 1):
        key = tuple(sorted(bits.items()))
        if key not in measured:
            try:
                measured[key] = _train_and_score(model, policy, train, test, representative, qat_epochs,
                                                 range(seed, seed + seeds))
            except ExportError as err:
                skipped.append((budget, f"{label}: {err}"))
                say(f"[{step}/{len(plan)}] {label}: export failed: {err}")
                continue
        metrics, file_kernels, accuracies = measured[key]
        rows.append({"kind": kind, "label": label, "budget": budget, "budget_bytes": cap,
                     "kernel_bytes": file_kernels,
                     "predicted_kernel_bytes": sum(layer_size(by_name[n], b, size) for n, b in bits.items()),
                     "size_bytes": metrics["size_bytes"], "gzip_bytes": metrics["gzip_bytes"],
                     "accuracy": float(np.mean(accuracies)), "accuracies": accuracies, "bits": dict(bits)})
        if latency is not None:
            known = all(b in latency.layers.get(n, {b: None}) for n, b in bits.items())  # a uniform width unmeasured: None
            rows[-1].update(budget_us=cap_us, predicted_us=latency.total_us(bits) if known else None)
        say(f"[{step}/{len(plan)}] {label}: acc {rows[-1]['accuracy']:.2%}, {file_kernels:,} kernel bytes")
    return ParetoResult(rows, skipped, total_size(layers, 8, size), report.method, time.perf_counter() - start,
                        report, size)
