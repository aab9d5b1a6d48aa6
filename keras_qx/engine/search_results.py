"""The rows of a bits search and their table (``BitWidthTuner.results()``,
``results_summary()`` and the CLI's CSV)."""
from __future__ import annotations

import csv
import io

from keras_qx.engine.search_space import FLOAT, HP_PREFIX, assignment_cost

__all__ = ["trial_row", "format_results"]


def trial_row(trial, metric_name: str, units=None, warm_id=None) -> dict:
    """One trial as a row of ``BitWidthTuner.results()``."""
    values = trial.hyperparameters.values
    bits = {k[len(HP_PREFIX):]: ("float" if v == FLOAT else v) for k, v in values.items() if k.startswith(HP_PREFIX)}
    metrics = trial.metrics
    metric = metrics.get_last_value(metric_name) if metrics.exists(metric_name) else None
    size = metrics.get_last_value("kernel_bytes") if metrics.exists("kernel_bytes") else None
    seconds = {k: float(metrics.get_last_value(k)) for k in ("trial_seconds", "qat_seconds") if metrics.exists(k)}
    if size is None and units is not None:
        size = assignment_cost(units, values)
    return {"trial_id": trial.trial_id, "status": trial.status, "bits": bits,
            "kernel_bytes": int(size) if size is not None else None, "metric": metric,
            "score": trial.score, "warm_start": trial.trial_id == warm_id,
            "hyperparameters": {k: v for k, v in values.items() if not k.startswith((HP_PREFIX, "tuner/"))},
            **seconds}


def format_results(rows, objective="metric", direction="max", *, budget_bytes=None, stats=None, fmt="markdown",
                   limit: int | None = None) -> str:
    """Trials as a Markdown table (best first) or CSV (``fmt="csv"``, trial order)."""
    groups, hps = [], []
    for r in rows:
        groups += [g for g in r["bits"] if g not in groups]
        hps += [h for h in r.get("hyperparameters", {}) if h not in hps]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["trial_id", "status", *hps, *groups, "kernel_bytes", objective, "score", "warm_start"])
        for r in rows:
            writer.writerow([r["trial_id"], r["status"], *[r["hyperparameters"].get(h, "") for h in hps],
                             *[r["bits"].get(g, "") for g in groups], r["kernel_bytes"],
                             r["metric"], r["score"], int(r["warm_start"])])
        return buf.getvalue()
    sign = -1 if direction == "max" else 1
    ordered = sorted(rows, key=lambda r: (r["score"] is None, sign * (r["score"] or 0), r["trial_id"]))[:limit]
    cols = hps + groups
    lines = [f"| trial | status | {' | '.join(cols)} | kernel bytes | {objective} | score |",
             "|" + "---|" * (len(cols) + 5)]
    for r in ordered:
        tag = " (warm)" if r["warm_start"] else ""
        metric = f"{r['metric']:.4f}" if r["metric"] is not None else "-"
        score = f"{r['score']:.4f}" if r["score"] is not None else "-"
        size = f"{r['kernel_bytes']:,}" if r["kernel_bytes"] is not None else "-"
        cells = [str(r.get("hyperparameters", {}).get(h, "")) for h in hps] + [str(r["bits"].get(g, "")) for g in groups]
        lines.append(f"| {r['trial_id']}{tag} | {r['status']} | {' | '.join(cells)} "
                     f"| {size} | {metric} | {score} |")
    if budget_bytes is not None or stats:
        notes = []
        if budget_bytes is not None:
            notes.append(f"budget {budget_bytes:,} kernel bytes")
        if stats:
            notes.append(f"{stats.get('rejected', 0)} over-budget proposal(s) rejected, never trained")
        lines += ["", "; ".join(notes) + "."]
    return "\n".join(lines)
