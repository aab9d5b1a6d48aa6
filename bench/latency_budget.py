"""Where size and speed disagree (issue 20): a size-optimal policy against a latency-aware one.

Two trained models on this runtime's facts (bench/results/latency.md): a 32x32 CNN on digits
(upsampled), most of whose bytes are convolutions, and INT4 convolutions run on the built-in
kernels (XNNPACK does not take them) several times slower than int8; and the digits CNN, whose
big Dense layer at 2 bits (INT2) runs on the built-in kernels slower than at INT4. For each:
``auto_policy`` at a size budget (the size-optimal policy; the first budget, from 0.8x down, at
which it is not already about the fastest; with the default "loss" sensitivity, else the data-free
"sqnr" one, and the budgets where they agree listed), then at the same size budget plus a
latency budget of 0.8-0.9x the size-optimal file's predicted time (raised by 0.05 until an
allocation fits). Each policy is trained (QAT, 3 epochs), exported (int8 in and out) and verified; the table
gives the file's kernel bytes, its measured time (``invoke()`` alone, 1 thread, median of 300)
and its test accuracy in the runtime.

Run: python bench/latency_budget.py   (about 8 minutes on 2 cores; writes bench/results/latency_budget.md)
"""
from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import keras_qx as qx  # noqa: E402
from keras_qx._compat import keras  # noqa: E402
from keras_qx._io import write_atomic  # noqa: E402
from keras_qx._seed import seeded  # noqa: E402
from bench.latency import conv_net  # noqa: E402
from keras_qx.data import digits_cnn, load_digits  # noqa: E402
from keras_qx.engine.latency import _time_file  # noqa: E402
from keras_qx.engine.sensitivity import quantizable_layers  # noqa: E402

CACHE = os.environ.get("KERAS_QX_BENCH_CACHE", os.path.join(HERE, "results", "latency_cache.json"))
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers


def load_digits32():
    """scikit-learn's digits, each 8x8 image upsampled to 32x32 (pixel repetition)."""
    (x, y), (xt, yt) = load_digits()
    up = lambda a: np.kron(a, np.ones((1, 4, 4, 1), a.dtype))  # noqa: E731
    return (up(x), y), (up(xt), yt)


def conv32(seed: int = 0):
    """bench/latency.py's 32x32 CNN on one channel: 87% of its kernel bytes in convolutions."""
    return conv_net(seed, channels=1, name="conv32")


CASES = {
    # name: (builder, data, float epochs, size budget, latency budget as a fraction of the
    # size-optimal file's predicted time, raised by 0.05 until an allocation fits it)
    # (size budgets: the first, scanning down, where a latency-aware policy beats the size-optimal one)
    "conv32 (INT4 convolutions)": (conv32, load_digits32, 20, ("0.8x", "0.7x", "0.6x", "0.5x"), 0.8),
    "digits_cnn (INT2 Dense)": (lambda: digits_cnn(), load_digits, 20, ("0.5x",), 0.9),
}


def _compile(model, lr):
    model.compile(keras.optimizers.Adam(lr), LOSS, metrics=["accuracy"])
    return model


def row(model, policy, x, y, xt, yt, label):
    with seeded(0):
        qat = _compile(qx.calibrate(qx.quantize(model, policy), x[:500]), 1e-4)
        qat.fit(x, y, epochs=3, batch_size=64, verbose=0)
    tfl = qx.export_tflite(qat, x[:300], int8_io=True)  # as the latency table's files: int8 in and out
    acc = qx.evaluate_tflite(tfl, xt, yt, latency_runs=0)["accuracy"]
    us = _time_file(bytes(tfl), xt[:1], 1, 300)
    meta = policy.meta["auto_policy"]
    bits = ", ".join(f"{n} {v['bits']}" for n, v in meta["layers"].items())
    return (label, bits, meta["predicted_kernel_bytes"], meta.get("predicted_latency_us"), us, acc,
            tfl.report.info.kernel_bytes)


def disagreement(model, report, table, size_budgets, fraction, notes, name):
    """``(size budget, size-optimal policy, latency-aware policy, latency budget)`` at the first
    size budget where a latency budget of ``fraction`` (up to 0.95) of the size-optimal file's
    predicted time fits, else None; each budget where none fits is noted."""
    for size_budget in size_budgets:
        by_size = qx.auto_policy(model, report=report, budget=size_budget, latency=table, verbose=0)
        size_us = by_size.meta["auto_policy"]["predicted_latency_us"]
        for f in [fraction + 0.05 * k for k in range(4) if fraction + 0.05 * k < 1]:  # the tightest that fits
            try:
                return size_budget, by_size, qx.auto_policy(
                    model, report=report, budget=[size_budget, f"{f * size_us:.1f}us"], latency=table, verbose=0), \
                    f * size_us
            except qx.InfeasibleBudget:
                continue
        bits = ", ".join(f"{n} {v['bits']}" for n, v in by_size.meta["auto_policy"]["layers"].items())
        notes.append(f"- {name}, `{report.method}` sensitivity, {size_budget}: the size-optimal policy ({bits}) "
                     f"is predicted at {size_us:.1f} µs and no allocation fits 0.95x of it: size and speed agree.")
    return None


def main() -> int:
    start = time.perf_counter()
    lines = [f"# Size-optimal vs latency-aware policies (issue 20)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 runtime thread; "
             "times measured in the runtime (`invoke()` alone, median of 300). Rerun: `python bench/latency_budget.py`.", "",
             "| model | policy | bits | kernel bytes (predicted / file) | predicted µs | measured µs | within the latency budget | test accuracy |",
             "|---|---|---|---:|---:|---:|---|---:|"]
    notes = []
    for name, (build, load, epochs, size_budgets, fraction) in CASES.items():
        (x, y), (xt, yt) = load()
        with seeded(0):
            model = _compile(build(), 2e-3)
            model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
        table = qx.latency_table(model, (2, 4, 8), x=x[:1], cache=CACHE, verbose=1)
        found = None
        for method in ("loss", "sqnr"):  # the default first; the data-free ranking where they agree
            report = qx.sensitivity(model, x[:512], y[:512], (2, 4, 8), method=method, verbose=0)
            found = disagreement(model, report, table, size_budgets, fraction, notes, name)
            if found is not None:
                break
        if found is None:
            continue
        size_budget, by_size, by_time, budget_us = found
        names = [l.name for l in quantizable_layers(model)]
        uniform8 = qx.auto_policy(model, report=report, budget="1x", keep=names, latency=table, verbose=0)
        for label, policy in ((f"int8", uniform8), (f"size-optimal ({size_budget}, {method})", by_size),
                              (f"latency-aware ({size_budget}, {budget_us:.1f} µs, {method})", by_time)):
            label_, bits, kb, pred, us, acc, file_kb = row(model, policy, x, y, xt, yt, label)
            meets = "yes" if us <= budget_us else "no"
            lines.append(f"| {name} | {label_} | {bits} | {kb:,} / {file_kb:,} | {pred:.1f} | {us:.1f} | {meets} | {acc:.1%} |")
            print(lines[-1], flush=True)
    if notes:
        lines += ["", "Where the size-optimal policy is already about the fastest (the sensitive layers are the "
                  "slow ones at low bits, so the allocation avoids them either way):", ""] + notes
    lines += ["", f"Total {time.perf_counter() - start:.0f} s."]
    write_atomic(os.path.join(HERE, "results", "latency_budget.md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
