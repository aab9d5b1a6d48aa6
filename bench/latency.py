"""The latency model against the runtime (issue 20): predicted vs measured time of whole files.

For each model: the per-layer table (``qx.latency_table``, measured once and cached), then files
at uniform 8/4/2 bits and at random mixes, each exported and timed whole in the child runtime
(``invoke()`` alone, 1 thread, 10 warm-up runs, median of 300), beside ``qx.predict_latency``.
The uniform-int8 file is where the model's ``base_us`` is read, so its error is 0 by
construction: the error columns are over the other files.

Run: python bench/latency.py [--models digits_cnn,...] [--mixes 3]
     (about 15 minutes on 2 cores; writes bench/results/latency.md; the cache in
     bench/results/latency_cache.json is reused, delete it to measure anew)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import keras_qx as qx  # noqa: E402
from keras_qx._compat import keras  # noqa: E402
from keras_qx._io import write_atomic  # noqa: E402
from keras_qx._seed import seeded  # noqa: E402
from keras_qx.engine.latency import _exported, _model_inputs, _time_file, latency_table, predict_latency  # noqa: E402
from keras_qx.engine.sensitivity import quantizable_layers  # noqa: E402

CACHE = os.environ.get("KERAS_QX_BENCH_CACHE", os.path.join(HERE, "results", "latency_cache.json"))
RUNS = 300
L = keras.layers


def wide_mlp(seed: int = 0):
    """A large Dense stack (1024 wide): where INT4 FULLY_CONNECTED is faster than int8."""
    with seeded(seed):
        inputs = keras.Input((256,), name="features")
        x = L.Dense(1024, activation="relu", name="fc1")(inputs)
        x = L.Dense(1024, activation="relu", name="fc2")(x)
        x = L.Dense(1024, activation="relu", name="fc3")(x)
        return keras.Model(inputs, L.Dense(10, name="logits")(x), name="wide_mlp")


def conv_net(seed: int = 0, channels: int = 3, name: str = "conv_net"):
    """A 32x32 CNN of 3x3 convolutions (32-128 filters, 87% of its kernel bytes): where INT4
    convolutions are slow."""
    with seeded(seed):
        inputs = keras.Input((32, 32, channels), name="image")
        x = L.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
        x = L.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
        x = L.MaxPooling2D(name="pool1")(x)
        x = L.Conv2D(128, 3, padding="same", activation="relu", name="conv3")(x)
        x = L.MaxPooling2D(name="pool2")(x)
        x = L.Conv2D(128, 3, padding="same", activation="relu", name="conv4")(x)
        x = L.GlobalAveragePooling2D(name="gap")(x)
        x = L.Dense(256, activation="relu", name="fc1")(x)
        return keras.Model(inputs, L.Dense(10, name="logits")(x), name=name)


def models():
    from bench.coverage import families
    from keras_qx.data import digits_cnn, mnist1d_cnn, mnist1d_lstm

    fam = families()
    return {
        "digits_cnn": digits_cnn, "mnist1d_cnn": mnist1d_cnn, "mnist1d_lstm": mnist1d_lstm,
        "conv_net": conv_net, "wide_mlp": wide_mlp,
        "MobileNet": fam["MobileNet"], "MobileNetV2": fam["MobileNetV2"], "RegNet": fam["RegNet"],
        "TransformerBlock": fam["TransformerBlock"],
    }


def measured_us(model, bits, samples) -> float:
    """The file of ``model`` at ``bits``, calibrated on ``samples``, timed as the table's files are."""
    return _time_file(*_exported(model, bits, samples), 1, RUNS)


def policies(model, mixes: int, seed: int = 0):
    names = [l.name for l in quantizable_layers(model)]
    out = [("uniform 8", {}), ("uniform 4", {n: 4 for n in names}), ("uniform 2", {n: 2 for n in names})]
    rng = np.random.default_rng(seed)
    for i in range(mixes):
        out.append((f"mix {i + 1}", {n: int(rng.choice([2, 4, 8])) for n in names}))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(models()))
    parser.add_argument("--mixes", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latency.md"))
    parser.add_argument("--cache", default=CACHE)
    args = parser.parse_args(argv)
    builders = models()
    rows, summary = [], []
    for name in args.models.split(","):
        model = builders[name]()
        x = _model_inputs(model)
        start = time.perf_counter()
        table = latency_table(model, (2, 4, 8), x=x, cache=args.cache, verbose=1)
        table_s = time.perf_counter() - start
        errors = []
        for label, bits in policies(model, args.mixes):
            predicted = predict_latency(model, qx.Policy.from_bits(bits), table=table).total_us
            got = measured_us(model, bits, x)
            error = (predicted - got) / got
            if label != "uniform 8":
                errors.append(abs(error))
            rows.append((name, label, predicted, got, error))
            print(f"{name:16s} {label:10s} predicted {predicted:9.1f} µs measured {got:9.1f} µs {error:+.1%}", flush=True)
        summary.append((name, len(table.layers), table_s, statistics.mean(errors), max(errors)))
    lines = [f"# Latency model: predicted vs measured (issue 20)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; runtime: {table.runtime}. "
             f"Each file timed whole in the child runtime: `invoke()` alone, 10 warm-up runs, median of {RUNS}. "
             "The prediction is the per-layer table (one-layer files, measured once, cached) plus the model's "
             "rest, read at uniform int8 (so that row is exact by construction and left out of the errors). "
             "Rerun: `python bench/latency.py`.", "",
             "| model | quantizable layers | table built (s) | mean abs error | max abs error |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {m} | {n} | {s:.0f} | {mean:.0%} | {worst:.0%} |" for m, n, s, mean, worst in summary]
    every = [abs(r[4]) for r in rows if r[1] != "uniform 8"]
    lines += ["", f"Over all {len(every)} files: mean abs error {statistics.mean(every):.0%}, "
              f"median {statistics.median(every):.0%}, max {max(every):.0%}.", "",
              "| model | policy | predicted µs | measured µs | error |", "|---|---|---:|---:|---:|"]
    lines += [f"| {m} | {p} | {pr:.1f} | {me:.1f} | {e:+.0%} |" for m, p, pr, me, e in rows]
    write_atomic(args.out, ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
