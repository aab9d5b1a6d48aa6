"""Where size and speed disagree (issue 20): a size-optimal policy against a latency-aware one.

Two trained models on this runtime's facts (bench/results/latency.md): the digits CNN, whose INT4
convolutions run on the built-in kernels (XNNPACK does not take them) several times slower than
int8, and an MNIST-1D MLP with 1024-wide Dense layers, whose INT2 FULLY_CONNECTEDs run on the
built-in kernels far slower than INT4 or int8. For each: ``auto_policy`` at a size budget (the
size-optimal policy), then at the same size budget plus a latency budget below the size-optimal
file's predicted time. Each policy is trained (QAT), exported and verified; the table gives the
file's measured time (``invoke()`` alone, 1 thread, median of 300), its kernel bytes and its test
accuracy.

Run: python bench/latency_budget.py   (about 5 minutes on 2 cores; writes bench/results/latency_budget.md)
"""
from __future__ import annotations

import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import keras_qx as qx  # noqa: E402
from keras_qx._compat import keras  # noqa: E402
from keras_qx._io import write_atomic  # noqa: E402
from keras_qx._seed import seeded  # noqa: E402
from keras_qx.data import digits_cnn, load_digits, load_mnist1d  # noqa: E402
from keras_qx.engine.latency import _time_file  # noqa: E402
from keras_qx.engine.sensitivity import quantizable_layers  # noqa: E402

CACHE = os.environ.get("KERAS_QX_BENCH_CACHE", os.path.join(HERE, "results", "latency_cache.json"))
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers


def mnist1d_mlp(seed: int = 0):
    with seeded(seed):
        inputs = keras.Input((40, 1), name="signal")
        x = L.Flatten(name="flatten")(inputs)
        x = L.Dense(512, activation="relu", name="fc1")(x)
        x = L.Dense(1024, activation="relu", name="fc2")(x)
        x = L.Dense(1024, activation="relu", name="fc3")(x)
        return keras.Model(inputs, L.Dense(10, name="logits")(x), name="mnist1d_mlp")


CASES = {
    # name: (builder, data, float epochs, size budget, the first latency budget tried as a fraction
    # of the size-optimal file's predicted time; raised by 0.1 until one fits)
    "digits_cnn": (lambda: digits_cnn(), load_digits, 20, "0.5x", 0.4),
    "mnist1d_mlp": (mnist1d_mlp, load_mnist1d, 30, "0.55x", 0.2),
}


def _compile(model, lr):
    model.compile(keras.optimizers.Adam(lr), LOSS, metrics=["accuracy"])
    return model


def row(model, policy, x, y, xt, yt, label):
    with seeded(0):
        qat = _compile(qx.calibrate(qx.quantize(model, policy), x[:500]), 1e-4)
        qat.fit(x, y, epochs=3, batch_size=64, verbose=0)
    tfl = qx.export_tflite(qat, x[:300])
    acc = qx.evaluate_tflite(tfl, xt, yt, latency_runs=0)["accuracy"]
    us = _time_file(bytes(tfl), xt[:1], 1, 300)
    meta = policy.meta["auto_policy"]
    bits = ", ".join(f"{n} {v['bits']}" for n, v in meta["layers"].items())
    return (label, bits, meta["predicted_kernel_bytes"], meta.get("predicted_latency_us"), us, acc,
            tfl.report.info.kernel_bytes)


def main() -> int:
    start = time.perf_counter()
    lines = [f"# Size-optimal vs latency-aware policies (issue 20)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 runtime thread; "
             "times measured in the runtime (`invoke()` alone, median of 300). Rerun: `python bench/latency_budget.py`.", "",
             "| model | policy | bits | kernel bytes (predicted / file) | predicted µs | measured µs | test accuracy |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, (build, load, epochs, size_budget, fraction) in CASES.items():
        (x, y), (xt, yt) = load()
        with seeded(0):
            model = _compile(build(), 2e-3)
            model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
        report = qx.sensitivity(model, x[:512], y[:512], (2, 4, 8), verbose=0)
        table = qx.latency_table(model, (2, 4, 8), x=x[:1], cache=CACHE, verbose=1)
        by_size = qx.auto_policy(model, report=report, budget=size_budget, latency=table, verbose=0)
        size_us = by_size.meta["auto_policy"]["predicted_latency_us"]
        by_time = None
        for f in [fraction + 0.1 * k for k in range(10) if fraction + 0.1 * k < 1]:  # the tightest that fits
            budget_us = f * size_us
            try:
                by_time = qx.auto_policy(model, report=report, budget=[size_budget, f"{budget_us:.1f}us"],
                                         latency=table, verbose=0)
                break
            except qx.InfeasibleBudget:
                continue
        if by_time is None:
            raise SystemExit(f"{name}: no latency budget below the size-optimal file's time fits {size_budget}.")
        names = [l.name for l in quantizable_layers(model)]
        uniform8 = qx.auto_policy(model, report=report, budget="1x", keep=names, latency=table, verbose=0)
        for label, policy in ((f"int8", uniform8), (f"size-optimal ({size_budget})", by_size),
                              (f"latency-aware ({size_budget}, {budget_us:.1f} µs)", by_time)):
            label_, bits, kb, pred, us, acc, file_kb = row(model, policy, x, y, xt, yt, label)
            lines.append(f"| {name} | {label_} | {bits} | {kb:,} / {file_kb:,} | {pred:.1f} | {us:.1f} | {acc:.1%} |")
            print(lines[-1], flush=True)
    lines += ["", f"Total {time.perf_counter() - start:.0f} s."]
    write_atomic(os.path.join(HERE, "results", "latency_budget.md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
