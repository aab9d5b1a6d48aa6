"""GPTQ rounding without training (issue 21) against round-to-nearest and against QAT.

Three float models, each trained once: the MNIST-1D CNN (``keras_qx.data.mnist1d_cnn``), a text
classifier (Embedding(10,000, 32) -> GlobalAveragePooling1D -> Dense(64, relu) -> Dense(4) on a
synthetic keyword task) and a one-block transformer on the same task (:func:`transformer_model`). Each at uniform 4-bit and 2-bit weights and at the mixed policy
``qx.auto_policy(..., budget="0.3x")``, three ways to the file: ``qx.calibrate`` on 256 samples
(round-to-nearest), ``qx.calibrate(..., weights="gptq")`` on the same 256 samples, and
calibrate + 3 QAT epochs (Adam 1e-4). Every accuracy is the exported file's, in the TFLite
runtime, on held-out samples.

Run: python bench/gptq.py   (a few minutes on 2 cores; writes bench/results/gptq.md)
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
from keras_qx._compat import keras, tf  # noqa: E402
from keras_qx._io import write_atomic  # noqa: E402
from keras_qx._seed import seeded  # noqa: E402
from keras_qx.data import load_mnist1d, mnist1d_cnn  # noqa: E402
from keras_qx.lite.convert import convert, converter_for  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CALIBRATION, QAT_EPOCHS = 256, 3
VOCAB, LENGTH, CLASSES, KEYWORDS = 10000, 32, 4, 400


def _compile(model, lr):
    model.compile(keras.optimizers.Adam(lr), LOSS, metrics=["accuracy"])
    return model


def text_data(seed: int = 0):
    """Token ids (n, 32) and a class 0..3: about 30% of the tokens are keywords (the first 400
    ids, keyword k belonging to class k % 4), half of them of the sample's class, the rest of any
    class; the other tokens are noise ids."""
    rng = np.random.default_rng(seed)
    n = 5000
    y = rng.integers(0, CLASSES, n)
    keyword = rng.random((n, LENGTH)) < 0.3
    own = rng.random((n, LENGTH)) < 0.5
    cls = np.where(own, y[:, None], rng.integers(0, CLASSES, (n, LENGTH)))
    words = rng.integers(0, KEYWORDS // CLASSES, (n, LENGTH)) * CLASSES + cls
    ids = np.where(keyword, words, rng.integers(KEYWORDS, VOCAB, (n, LENGTH)))
    x, y = ids.astype("int32"), y.astype("int32")
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def text_model(seed: int = 0):
    with seeded(seed):
        ids = keras.Input((LENGTH,), dtype="int32", name="ids")
        h = keras.layers.Embedding(VOCAB, 32, name="emb")(ids)
        h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
        h = keras.layers.Dense(64, activation="relu", name="fc")(h)
        return keras.Model(ids, keras.layers.Dense(CLASSES, name="logits")(h), name="text")


def transformer_model(seed: int = 0):
    """The text task through one encoder block: Embedding(10,000, 32) -> MultiHeadAttention (2
    heads) + Add + LayerNormalization -> Dense(64, relu) -> Dense(32) + Add + LayerNormalization
    -> pooling -> Dense(4). GPTQ rounds its attention projections and feed-forward (EinsumDense)."""
    L = keras.layers
    with seeded(seed):
        ids = keras.Input((LENGTH,), dtype="int32", name="ids")
        x = L.Embedding(VOCAB, 32, name="emb")(ids)
        x = L.LayerNormalization(name="ln1")(L.Add()([x, L.MultiHeadAttention(2, 16, name="mha")(x, x)]))
        f = L.Dense(32, name="ff2")(L.Dense(64, activation="relu", name="ff1")(x))
        x = L.GlobalAveragePooling1D(name="pool")(L.LayerNormalization(name="ln2")(L.Add()([x, f])))
        return keras.Model(ids, L.Dense(CLASSES, name="logits")(x), name="text_transformer")


def _file_accuracy(qat, x, xt, yt):
    tfl = qx.export_tflite(qat, x[:200], min_agreement=0.5)
    return qx.evaluate_tflite(tfl, xt, yt)["accuracy"], len(tfl)


def rows_for(name, model, data, epochs, seed: int = 0) -> list:
    (x, y), (xt, yt) = data
    with seeded(seed):
        _compile(model, 2e-3).fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    float_acc = qx.evaluate_tflite(convert(converter_for(model))[0], xt, yt)["accuracy"]
    policies = {"uniform 4-bit": {"default": {"weight_bits": 4}}, "uniform 2-bit": {"default": {"weight_bits": 2}},
                "mixed 0.3x": qx.auto_policy(model, x[:512], y[:512], budget="0.3x", verbose=0)}
    rows = []
    for label, policy in policies.items():
        calib = x[:CALIBRATION]
        rtn_acc, size = _file_accuracy(qx.calibrate(qx.quantize(model, policy), calib), x, xt, yt)
        start = time.perf_counter()
        gptq = qx.calibrate(qx.quantize(model, policy), calib, weights="gptq")
        seconds = time.perf_counter() - start
        gptq_acc, _ = _file_accuracy(gptq, x, xt, yt)
        with seeded(seed):
            qat = _compile(qx.calibrate(qx.quantize(model, policy), calib), 1e-4)
            qat.fit(x, y, epochs=QAT_EPOCHS, batch_size=64, verbose=0)
        qat_acc, _ = _file_accuracy(qat, x, xt, yt)
        if label.startswith("mixed"):
            label += " (" + ", ".join(f"{k} {v['weight_bits']}" for k, v in policy.layers.items()) + ")"
        rows.append(f"| {name} | {label} | {float_acc:.2%} | {rtn_acc:.2%} | {gptq_acc:.2%} | {qat_acc:.2%} | "
                    f"{size:,} | {seconds:.1f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> int:
    start = time.perf_counter()
    lines = ["| model | policy | float acc | RTN file acc | GPTQ file acc | QAT file acc | file bytes | GPTQ seconds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += rows_for("mnist1d_cnn", mnist1d_cnn(0), load_mnist1d(), epochs=30)
    lines += rows_for("text (Embedding 10k x 32)", text_model(0), text_data(0), epochs=5)
    lines += rows_for("text transformer (1 block, 32 wide)", transformer_model(0), text_data(0), epochs=5)
    import tf_keras
    import tensorflow_model_optimization as tfmot
    lines += [
        "",
        f"RTN: `qx.calibrate(qat, x[:{CALIBRATION}])` (round-to-nearest); GPTQ: `qx.calibrate(qat, x[:{CALIBRATION}], "
        f"weights=\"gptq\")` (its seconds: the whole call, activation passes included); QAT: calibrate, then "
        f"{QAT_EPOCHS} epochs (Adam 1e-4) on the training set. Accuracy of each exported file in the TFLite runtime: "
        "MNIST-1D's 1,000 test signals (the CNN trained 30 float epochs, Adam 2e-3), and 1,000 held-out samples of "
        "the text task (4,000 training samples of 32 token ids, about 30% of them from 400 keywords of class "
        "id % 4, half of those of the sample's class; 5 float epochs). Mixed: `qx.auto_policy(model, x[:512], y[:512], "
        "budget=\"0.3x\")`. GPTQ rounds the Dense and Conv1D kernels and the transformer's attention projections and "
        "feed-forward (EinsumDense); the Embedding table keeps round-to-nearest.",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs (a 2-core VM shared with other jobs); Python "
        f"{platform.python_version()}, TF {tf.__version__}, tf_keras {tf_keras.__version__}, tfmot "
        f"{tfmot.__version__}; {time.perf_counter() - start:.0f} s. Rerun: `python bench/gptq.py`",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    write_atomic(os.path.join(HERE, "results", "gptq.md"), ("# GPTQ rounding without training\n\n" + text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
