"""BitWidthTuner vs auto_policy on the digits CNN, at 0.6x of the uniform-int8 kernel bytes.

Per seed: ``digits_cnn()`` trained 20 float epochs (Adam 1e-3, batch 64, as ``demo.train_digits``);
the last fifth of the training split is the search's validation set. Then

* auto_policy at the budget, QAT ``--qat-epochs`` (Adam 1e-4) on the other four fifths;
* a ``--trials``-trial BitWidthTuner search per ``--oracle`` (warm start = auto_policy) with the
  same QAT epochs per trial; its best trial's model.

Both are exported to TFLite and scored on the test split. Every trained trial is exported too, to
check its kernel bytes in the file against the budget. The per-trial overhead is the search's
time per trial (warm-start sensitivity excluded) over the time of a plain
``quantize + compile + fit`` of the same epochs and data. Prints Markdown and writes
``bench/results/search.md``.

Run:
    cd /work/wt-search && PYTHONPATH=. /work/venv/bin/python bench/search.py
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time

import numpy as np

from keras_qx._compat import keras, tf
from keras_qx.demo import train_digits
from keras_qx.engine.allocate import auto_policy, budget_from
from keras_qx.engine.sensitivity import quantizable_layers
from keras_qx.lite.evaluate import evaluate_tflite
from keras_qx._io import write_atomic
from keras_qx.lite.export import export_tflite
from keras_qx.qat.quantize import quantize
from keras_qx.quant.policy import Policy
from keras_qx.engine.search import BitWidthTuner

HERE = os.path.dirname(os.path.abspath(__file__))


def _qat(model, policy, x, y, val, epochs):
    qat = quantize(model, policy)
    qat.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    qat.fit(x, y, epochs=epochs, batch_size=64, validation_data=val, verbose=0)
    return qat


def run_seed(seed, oracle, args, say):
    model, ((x, y), (xt, yt)) = train_digits(args.epochs, seed=seed, verbose=0)
    n_val = len(x) // 5
    xs, ys, val = x[:-n_val], y[:-n_val], (x[-n_val:], y[-n_val:])
    budget = budget_from(quantizable_layers(model), args.budget)

    keras.utils.set_random_seed(seed)
    auto = auto_policy(model, xs, ys, budget=budget, candidates=(4, 8), verbose=False)
    auto_tfl = export_tflite(_qat(model, auto, xs, ys, val, args.qat_epochs), xs[:300], verbose=0)
    auto_acc = evaluate_tflite(auto_tfl, xt, yt)["accuracy"]

    marks = {}

    def hook(line):
        if line.startswith("warm start"):
            marks["trials_start"] = time.perf_counter()
        say("    " + line)

    with tempfile.TemporaryDirectory() as tmp:
        tuner = BitWidthTuner(model, candidates=(4, 8), budget=budget, oracle=oracle,
                              max_trials=args.trials, directory=tmp, seed=seed, verbose=0)
        tuner.print_fn = hook  # the bench times the warm start from the tuner's own progress lines
        start = time.perf_counter()
        tuner.search(xs, ys, validation_data=val, epochs=args.qat_epochs, batch_size=64)
        end = time.perf_counter()
        rows = tuner.results()
        trained = [r for r in rows if r["status"] == "COMPLETED"]
        per_trial = (end - marks.get("trials_start", start)) / max(1, len(trained))
        inner = [r["qat_seconds"] for r in trained]
        best = tuner.best_policy().meta["search"]
        best_tfl = export_tflite(tuner.best_model(), xs[:300], verbose=0)
        best_acc = evaluate_tflite(best_tfl, xt, yt)["accuracy"]
        file_bytes = []
        for r in trained:
            tfl = export_tflite(tuner.trial_model(r["trial_id"]), xs[:300], verify=False)
            file_bytes.append(tfl.report.info.kernel_bytes)
        stats = tuner.stats

    # The same QAT runs outside the tuner, one per trained trial with that trial's bits, so the
    # comparison is paired (same policies, same count) and averages over as many runs.
    plain = []
    for r in trained[: args.plain_runs or len(trained)]:
        policy = Policy.from_bits({n: None if b == "float" else b
                                   for unit, b in r["bits"].items() for n in unit.split("+")})  # "a+b": tied
        keras.backend.clear_session()
        t0 = time.perf_counter()
        _qat(model, policy, xs, ys, val, args.qat_epochs)
        plain.append(time.perf_counter() - t0)
    plain_s = float(np.mean(plain))
    return {
        "seed": seed, "budget": budget, "auto_acc": auto_acc,
        "auto_bytes": auto.meta["auto_policy"]["predicted_kernel_bytes"], "search_acc": best_acc,
        "best_trial": best["trial_id"], "best_bytes": best["predicted_kernel_bytes"],
        "best_file_bytes": best_tfl.report.info.kernel_bytes, "trained": len(trained),
        "max_file_bytes": max(file_bytes), "all_fit": all(b <= budget for b in file_bytes),
        "rejected": stats["rejected"], "per_trial_s": per_trial, "plain_s": plain_s,
        "overhead": per_trial / plain_s, "search_s": end - start,
        "inner_s": float(np.mean(inner)), "inner_overhead": per_trial / float(np.mean(inner)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=20, help="float epochs")
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--budget", default="0.6x")
    parser.add_argument("--oracle", default="bayesian,random", help="comma-separated; one table each")
    parser.add_argument("--plain-runs", type=int, default=0, help="plain runs to time (0: one per trained trial)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    def say(text):
        print(text, file=sys.stderr, flush=True)

    sections = []
    for oracle in args.oracle.split(","):
        rows = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            say(f"{oracle}, seed {seed}: float training, auto_policy QAT, {args.trials}-trial search...")
            rows.append(run_seed(seed, oracle, args, say))
        sections.append(f"## {oracle} oracle\n\n" + _table(rows))
        print(sections[-1] + "\n", flush=True)
    env = (f"Python {platform.python_version()}, TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; "
           f"`{' '.join(shlex.quote(a) for a in ['bench/search.py', *(argv if argv is not None else sys.argv[1:])])}`")
    text = ("# BitWidthTuner vs auto_policy (digits CNN, budget " + args.budget + " of int8 kernel bytes)\n\n"
            + f"{args.trials} trials (first = auto_policy), {args.qat_epochs} QAT epochs per "
            "trial and for auto_policy, TFLite accuracy on the test split (449 images). `overhead` = search "
            "seconds per trial / the mean of plain quantize+compile+fit runs of the same epochs, one per "
            "trained trial with that trial's bits, run after the search (paired); `overhead (same moment)` = search seconds per trial / the "
            "quantize+compile+fit seconds measured inside the same trials (robust to other load on the machine). "
            "`all fit`: every trained trial exported, kernel bytes in the file <= budget.\n\n"
            + "\n\n".join(sections) + "\n\n" + env + "\n")
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "search.md"), text.encode())
    return 0


def _table(rows) -> str:
    head = ("| seed | budget B | auto_policy acc | search best acc | best trial | best kernel B (file) | "
            "trained | rejected | max trial file kernel B | all fit | s/trial | plain QAT s | overhead | "
            "in-trial QAT s | overhead (same moment) |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['budget']:,} | {r['auto_acc']:.2%} | {r['search_acc']:.2%} | {r['best_trial']} | "
                     f"{r['best_bytes']:,} ({r['best_file_bytes']:,}) | {r['trained']} | {r['rejected']} | "
                     f"{r['max_file_bytes']:,} | {'yes' if r['all_fit'] else 'NO'} | {r['per_trial_s']:.2f} | "
                     f"{r['plain_s']:.2f} | {r['overhead']:.2f}x | {r['inner_s']:.2f} | {r['inner_overhead']:.2f}x |")
    mean = {k: float(np.mean([r[k] for r in rows]))
            for k in ("auto_acc", "search_acc", "per_trial_s", "plain_s", "overhead", "inner_s", "inner_overhead")}
    lines.append(f"| mean | | {mean['auto_acc']:.2%} | {mean['search_acc']:.2%} | | | | | | "
                 f"{'yes' if all(r['all_fit'] for r in rows) else 'NO'} | {mean['per_trial_s']:.2f} | "
                 f"{mean['plain_s']:.2f} | {mean['overhead']:.2f}x | {mean['inner_s']:.2f} | {mean['inner_overhead']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
