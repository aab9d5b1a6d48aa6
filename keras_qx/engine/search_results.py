"""The rows of a bits search and their table (``BitWidthTuner.results()``,
``results_summary()`` and the CLI's CSV)."""
from __future__ import annotations

import csv
import io

from keras_qx.engine.search_space import FLOAT, HP_PREFIX, assignment_cost, assignment_latency

__all__ = ["trial_row", "format_results"]


def trial_row(trial, metric_name: str, units=None, warm_id=None, latency=None) -> dict:
    """One trial as a row of ``BitWidthTuner.results()`` (with a latency table, ``predicted_us``)."""
    values = trial.hyperparameters.values
    bits = {k[len(HP_PREFIX):]: ("float" if v == FLOAT else v) for k, v in values.items() if k.startswith(HP_PREFIX)}
    metrics = trial.metrics
    metric = metrics.get_last_value(metric_name) if metrics.exists(metric_name) else None
    size = metrics.get_last_value("kernel_bytes") if metrics.exists("kernel_bytes") else None
    seconds = {k: float(metrics.get_last_value(k)) for k in ("trial_seconds", "qat_seconds") if metrics.exists(k)}
    if size is None and units is not None:
        size = assignment_cost(units, values)
    extra = {}
    if latency is not None:
        us = metrics.get_last_value("predicted_us") if metrics.exists("predicted_us") else None
        layers_us = None if us is not None or units is None else assignment_latency(units, values)
        if layers_us is not None:
            us = latency.base_us + layers_us
        extra["predicted_us"] = None if us is None else float(us)
    return {"trial_id": trial.trial_id, "status": trial.status, "bits": bits,
            "kernel_bytes": int(size) if size is not None else None, "metric": metric,
            "score": trial.score, "warm_start": trial.trial_id == warm_id,
            "hyperparameters": {k: v for k, v in values.items() if not k.startswith((HP_PREFIX, "tuner/"))},
            **extra, **seconds}


def format_results(rows, objective="metric", direction="max", *, budget_bytes=None, stats=None, fmt="markdown",
                   limit: int | None = None, budget_us=None) -> str:
    """Trials as a Markdown table (best first) or CSV (``fmt="csv"``, trial order); a
    ``predicted µs`` column where the rows have a predicted latency."""
    groups, hps = [], []
    for r in rows:
        groups += [g for g in r["bits"] if g not in groups]
        hps += [h for h in r.get("hyperparameters", {}) if h not in hps]
    timed = any(r.get("predicted_us") is not None for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["trial_id", "status", *hps, *groups, "kernel_bytes", *(["predicted_us"] if timed else []),
                         objective, "score", "warm_start"])
        for r in rows:
            writer.writerow([r["trial_id"], r["status"], *[r["hyperparameters"].get(h, "") for h in hps],
                             *[r["bits"].get(g, "") for g in groups], r["kernel_bytes"],
                             *([r.get("predicted_us")] if timed else []),
                             r["metric"], r["score"], int(r["warm_start"])])
        return buf.getvalue()
    sign = -1 if direction == "max" else 1
    ordered = sorted(rows, key=lambda r: (r["score"] is None, sign * (r["score"] or 0), r["trial_id"]))[:limit]
    cols = hps + groups
    timed_head = " predicted µs |" if timed else ""
    lines = [f"| trial | status | {' | '.join(cols)} | kernel bytes |{timed_head} {objective} | score |",
             "|" + "---|" * (len(cols) + 5 + timed)]
    for r in ordered:
        tag = " (warm)" if r["warm_start"] else ""
        metric = f"{r['metric']:.4f}" if r["metric"] is not None else "-"
        score = f"{r['score']:.4f}" if r["score"] is not None else "-"
        size = f"{r['kernel_bytes']:,}" if r["kernel_bytes"] is not None else "-"
        cells = [str(r.get("hyperparameters", {}).get(h, "")) for h in hps] + [str(r["bits"].get(g, "")) for g in groups]
        us = (f" {r['predicted_us']:,.1f} |" if r.get("predicted_us") is not None else " - |") if timed else ""
        lines.append(f"| {r['trial_id']}{tag} | {r['status']} | {' | '.join(cells)} "
                     f"| {size} |{us} {metric} | {score} |")
    if budget_bytes is not None or budget_us is not None or stats:
        notes = []
        if budget_bytes is not None:
            notes.append(f"budget {budget_bytes:,} kernel bytes")
        if budget_us is not None:
            notes.append(f"latency budget {budget_us:,.1f} µs (predicted)")
        if stats:
            rejected = f"{stats.get('rejected', 0)} over-budget proposal(s) rejected, never trained"
            if budget_us is not None:
                rejected += f" ({stats.get('rejected_latency', 0)} over the latency budget)"
            notes.append(rejected)
        lines += ["", "; ".join(notes) + "."]
    return "\n".join(lines)
