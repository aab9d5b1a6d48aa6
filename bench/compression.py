"""Compression on the digits CNN: float32 / each post-training mode (dynamic, int8, float16,
int16x8) / int8 QAT / mixed / pruned + mixed / pruned + 4-bit / clustered + int8 / clustered +
mixed / pruned + clustered + mixed.

Trains ``digits_cnn()`` on ``load_digits()`` (Adam 1e-3, batch 64, ``--epochs``), then per
variant: prune (``qx.prune``, polynomial schedule from 0 to the target over the first 3/4 of
``--prune-epochs``, then constant; ``qx.strip_pruning``), cluster (``qx.cluster``, k-means++,
``--cluster-epochs`` at Adam 1e-4, ``preserve_sparsity`` after pruning; ``qx.strip_clustering``),
quantize (``preserve_sparsity=True`` for the pruned ones, ``preserve_clusters=True`` for the
clustered ones), QAT ``--qat-epochs`` (Adam 1e-4), export (verified against Keras) and score
the file in the TFLite runtime on the 449 test images. Sparsity and distinct values are
measured in the file (``inspect_tflite``'s per-tensor zeros and distinct values, per channel
for the per-channel quantized convolutions). Writes ``compression.md`` to ``--out``.

Run:
    cd /work/main && /work/venv/bin/python bench/compression.py
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import keras_qx as qx  # noqa: E402
from keras_qx._compat import keras, tf, tfmot  # noqa: E402
from keras_qx._seed import seeded  # noqa: E402
from keras_qx._io import write_atomic  # noqa: E402
from keras_qx.data import digits_cnn, load_digits  # noqa: E402
from keras_qx.lite.convert import convert, converter_for  # noqa: E402
from keras_qx.lite.export import file_distinct, file_sparsity  # noqa: E402
from keras_qx.lite.inspect import inspect_tflite  # noqa: E402
from keras_qx.lite.ptq import PTQ_MODES  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
W4 = {"default": {"weight_bits": 4, "activation_bits": 8}}


def _compile(model, lr):
    model.compile(keras.optimizers.Adam(lr), LOSS, metrics=["accuracy"])
    return model


def _pruned(model, data, sparsity, epochs, layers=None, rules=None):
    (x, y) = data
    steps = -(-len(x) // 64)
    end = max(1, int(0.75 * epochs * steps))
    pruned = _compile(qx.prune(model, sparsity, schedule="polynomial", end_step=end, frequency=max(1, steps // 4),
                               layers=layers, rules=rules), 1e-3)
    pruned.fit(x, y, epochs=epochs, batch_size=64, verbose=0, callbacks=qx.pruning_callbacks())
    return qx.strip_pruning(pruned)


def _clustered(model, data, clusters, epochs, preserve_sparsity):
    (x, y) = data
    clustered = _compile(qx.cluster(model, clusters, preserve_sparsity=preserve_sparsity), 1e-4)
    clustered.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return qx.strip_clustering(clustered)


def _qat(model, policy, data, epochs, preserve, clusters=False):
    (x, y) = data
    qat = _compile(qx.quantize(model, policy, preserve_sparsity=preserve, preserve_clusters=clusters), 1e-4)
    qat.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return qat


def run(epochs: int, prune_epochs: int, qat_epochs: int, seed: int, cluster_epochs: int = 4,
        say=print) -> tuple[list, dict, dict]:
    train, (x_test, y_test) = load_digits(seed=seed)
    x_train = train[0]
    rows, layers, distinct = [], {}, {}
    with seeded(seed):
        start = time.perf_counter()
        model = _compile(digits_cnn(seed=seed), 1e-3)
        model.fit(*train, epochs=epochs, batch_size=64, verbose=0)
        say(f"float model: {time.perf_counter() - start:.1f}s")
        float_file = convert(converter_for(model))[0]
        rows.append({"model": "float32", **qx.evaluate_tflite(float_file, x_test, y_test),
                     "sparsity": inspect_tflite(float_file).kernel_sparsity})
        for mode in PTQ_MODES:  # post-training: no training, the float model converted
            tfl = qx.ptq(model, mode, x_train[:300])
            rows.append({"model": f"PTQ {mode}", **qx.evaluate_tflite(tfl, x_test, y_test),
                         "sparsity": tfl.report.info.kernel_sparsity})
            say(f"PTQ {mode}: {rows[-1]['accuracy']:.2%}, {rows[-1]['size_bytes']:,} B")
        mixed = qx.auto_policy(model, *train, budget="0.6x", verbose=False)
        bits = ", ".join(f"{n} {f['weight_bits']}" for n, f in mixed.layers.items())
        variants = [
            ("int8 QAT", None, None, {}),
            (f"mixed (auto 0.6x: {bits})", None, mixed, {}),
            ("pruned 80% + mixed", {"sparsity": 0.8}, mixed, {}),
            ("pruned 90% + 4-bit", {"sparsity": 0.9}, W4, {}),
            ("pruned 90% (fc1 95%, conv1 50%) + 4-bit",
             {"sparsity": 0.9, "layers": {"fc1": {"sparsity": 0.95}, "conv1": {"sparsity": 0.5}}}, W4, {}),
            ("clustered 16 + int8", None, None, {"clusters": 16}),
            ("clustered 16 + mixed", None, mixed, {"clusters": 16}),
            ("pruned 80% + clustered 16 + mixed", {"sparsity": 0.8}, mixed, {"clusters": 16}),
        ]
        for name, pruning, policy, clustering in variants:
            start = time.perf_counter()
            base = model
            if pruning:
                base = _pruned(model, train, pruning["sparsity"], prune_epochs, layers=pruning.get("layers"))
            if clustering:
                base = _clustered(base, train, clustering["clusters"], cluster_epochs, preserve_sparsity=bool(pruning))
            qat = _qat(base, policy, train, qat_epochs, preserve=bool(pruning), clusters=bool(clustering))
            tfl = qx.export_tflite(qat, x_train[:300])
            rows.append({"model": name, **qx.evaluate_tflite(tfl, x_test, y_test),
                         "sparsity": tfl.report.info.kernel_sparsity})
            layers[name] = dict(file_sparsity(qat, tfl.report.info))
            distinct[name] = {n: (f"{c}/ch" if c is not None else str(t)) for n, t, c in file_distinct(qat, tfl.report.info)}
            say(f"{name}: {rows[-1]['accuracy']:.2%}, {rows[-1]['size_bytes']:,} B, gzip {rows[-1]['gzip_bytes']:,} B, "
                f"{time.perf_counter() - start:.1f}s")
    return rows, layers, distinct


def table(rows, layers, distinct=None) -> str:
    base = rows[0]
    out = ["| model | TFLite test accuracy | bytes | gzip bytes | gzip vs float32 | kernel sparsity in file |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['accuracy']:.2%} | {r['size_bytes']:,} | {r['gzip_bytes']:,} | "
                   f"{base['gzip_bytes'] / r['gzip_bytes']:.1f}x smaller | {r['sparsity']:.1%} |")
    names = sorted({n for v in layers.values() for n in v}, key=lambda n: list(next(iter(layers.values()))).index(n)
                   if n in next(iter(layers.values())) else 99)
    out += ["", "Per-layer kernel sparsity measured in each file (zeros of the stored integers):", "",
            "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, found in layers.items():
        out.append(f"| {model} | " + " | ".join(f"{found[n]:.1%}" if n in found else "-" for n in names) + " |")
    if distinct:
        out += ["", "Distinct kernel values measured in each file (`/ch`: the most in one output channel, for the "
                "per-channel quantized convolutions, whose channels have scales of their own; else per tensor):", "",
                "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for model, found in distinct.items():
            out.append(f"| {model} | " + " | ".join(found.get(n, "-") for n in names) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="float training epochs")
    parser.add_argument("--prune-epochs", type=int, default=8, help="pruning fine-tune epochs")
    parser.add_argument("--qat-epochs", type=int, default=4, help="QAT epochs")
    parser.add_argument("--cluster-epochs", type=int, default=4, help="clustering fine-tune epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, layers, distinct = run(args.epochs, args.prune_epochs, args.qat_epochs, args.seed, args.cluster_epochs)
    text = table(rows, layers, distinct)
    header = (f"# Compression on the digits CNN (bench/compression.py)\n\n"
              f"Float {args.epochs} epochs; pruning fine-tune {args.prune_epochs} epochs (polynomial to the target over "
              f"the first 3/4, then constant); clustering fine-tune {args.cluster_epochs} epochs at Adam 1e-4 (k-means++); "
              f"QAT {args.qat_epochs} epochs at Adam 1e-4 (pruned variants with preserve_sparsity=True, clustered ones "
              f"with preserve_clusters=True); seed {args.seed}; accuracy of the .tflite file in the TFLite runtime on 449 test "
              f"images; gzip level 9. Total {time.perf_counter() - start:.0f}s on {platform.processor() or platform.machine()}, "
              f"Python {platform.python_version()}, TF {tf.__version__}, tfmot {tfmot.__version__}.\n\n")
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "compression.md"), (header + text + "\n").encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
