"""Sensitivity methods on the digits CNN: cost against float training, agreement, and the
accuracy their allocations reach after QAT (in TFLite).

Run: python bench/sensitivity.py [--epochs 20] [--qat-epochs 2] [--budgets 0.75,0.6]
"""
from __future__ import annotations

import argparse
import platform
import os
import sys
import time

import numpy as np

from keras_qx._compat import keras, tf, tfmot
import keras_qx as qx
from keras_qx.engine.allocate import auto_policy, budget_from
from keras_qx.data import digits_cnn, load_digits
from keras_qx._io import write_atomic
from keras_qx.engine.sensitivity import METHODS, quantizable_layers, sensitivity


def _compile(model, lr):
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--budgets", default="0.75,0.6")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    (x, y), (xt, yt) = load_digits()
    model = _compile(digits_cnn(), 1e-3)
    start = time.perf_counter()
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    cold = time.perf_counter() - start
    model.fit(x, y, epochs=args.epochs - 4, batch_size=64, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    warm = time.perf_counter() - start
    say(f"2 float epochs: {cold:.2f}s (first two, with tracing), {warm:.2f}s (steady)")

    reports = {}
    for method in METHODS:
        reports[method] = sensitivity(model, x, y, (2, 4, 8), method=method, verbose=False)
        say(f"{method}: {reports[method].seconds:.2f}s")
    names = reports["loss"].layers
    lines = ["| method | seconds | vs 2 epochs (steady) | vs 2 epochs (first) | rank corr. with loss (4-bit) | (2-bit) |",
             "|---|---|---|---|---|---|"]
    for method, rep in reports.items():
        corr = [_spearman([rep.damage[n][b] for n in names], [reports["loss"].damage[n][b] for n in names])
                for b in (4, 2)]
        lines.append(f"| {method} | {rep.seconds:.2f} | {rep.seconds / warm:.2f}x | {rep.seconds / cold:.2f}x | "
                     f"{corr[0]:.2f} | {corr[1]:.2f} |")

    layers = quantizable_layers(model)
    int8 = budget_from(layers, "8bits")
    lines += ["", "| budget | method | bits (" + ", ".join(names) + ") | kernel bytes | TFLite accuracy |",
              "|---|---|---|---|---|"]
    for frac in (float(b) for b in args.budgets.split(",")):
        for method, rep in reports.items():
            policy = auto_policy(model, report=rep, budget=int(frac * int8))
            keras.utils.set_random_seed(0)
            qat = _compile(qx.quantize(model, policy), 1e-4)
            qat.fit(x, y, epochs=args.qat_epochs, batch_size=64, verbose=0)
            tfl = qx.export_tflite(qat, x[:300])
            acc = qx.evaluate_tflite(tfl, xt, yt, latency_runs=10)["accuracy"]
            bits = "/".join(str(policy.layers[n]["weight_bits"]) for n in names)
            kb = policy.meta["auto_policy"]["predicted_kernel_bytes"]
            lines.append(f"| {frac:.2f}x | {method} | {bits} | {kb:,} | {acc:.2%} |")
            say(f"{frac}x {method}: {bits} {acc:.2%}")
    lines += ["", f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
                  f"TF {tf.__version__}, tfmot {tfmot.__version__}. Sensitivity on 512 training samples "
                  "(Hessian: 256 samples, 8 Hutchinson probes); each time includes tracing.",
              "Rerun: `python bench/sensitivity.py`"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "sensitivity.md"), ("# Sensitivity methods (digits CNN)\n\n" + text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
