"""MNIST-1D (issue 11): a 1D CNN with MaxPooling1D and an LSTM keyword-spotting model, float vs
uniform int8 vs mixed precision (``auto_policy`` at 0.5x of the int8 kernel bytes), each QAT
model exported and verified against itself, accuracy measured in the TFLite runtime.

Run: python bench/mnist1d_models.py   (about a minute on 2 cores; writes bench/results/mnist1d.md)
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
from keras_qx._seed import seeded  # noqa: E402
from keras_qx._io import write_atomic  # noqa: E402
from keras_qx.data import load_mnist1d, mnist1d_cnn, mnist1d_lstm  # noqa: E402
from keras_qx.lite.convert import convert, converter_for  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
EPOCHS, QAT_EPOCHS = {"mnist1d_cnn": 30, "mnist1d_lstm": 20}, 3


def _compile(model, lr):
    model.compile(keras.optimizers.Adam(lr), LOSS, metrics=["accuracy"])
    return model


def rows_for(build, data, seed: int = 0) -> list:
    (x, y), (xt, yt) = data
    name = build.__name__
    with seeded(seed):
        model = _compile(build(seed), 2e-3)
        model.fit(x, y, epochs=EPOCHS[name], batch_size=64, verbose=0)
    f32 = convert(converter_for(model))[0]
    rows = [(name, "float32", qx.evaluate_tflite(f32, xt, yt, latency_runs=50), None, len(f32), None)]
    policies = {"int8": None, "mixed (auto 0.5x)": qx.auto_policy(model, x[:512], y[:512], budget="0.5x",
                                                                  verbose=False)}
    for label, policy in policies.items():
        with seeded(seed):
            qat = _compile(qx.calibrate(qx.quantize(model, policy), x[:500]), 1e-4)
            qat.fit(x, y, epochs=QAT_EPOCHS, batch_size=64, verbose=0)
        tfl = qx.export_tflite(qat, x[:300])
        bits = "" if policy is None else " (" + ", ".join(f"{k} {v['weight_bits']}" for k, v in policy.layers.items()) + ")"
        rows.append((name, label + bits, qx.evaluate_tflite(tfl, xt, yt, latency_runs=50), tfl.report.verification,
                     len(tfl), tfl.report.info))
    return rows


def main() -> int:
    start = time.perf_counter()
    data = load_mnist1d()
    lines = ["| model | variant | TFLite accuracy | bytes | kernel bytes | fully integer | TFLite vs Keras QAT: mean / max steps, top-1 agreement | latency ms |",
             "|---|---|---|---|---|---|---|---|"]
    for build in (mnist1d_cnn, mnist1d_lstm):
        for model, variant, ev, ver, size, info in rows_for(build, data):
            check = "-" if ver is None else f"{ver.mean_error_steps:.3f} / {ver.max_error_steps:.0f}, {ver.agreement:.1%}"
            kernels = "-" if info is None else f"{info.kernel_bytes:,}"
            integer = "-" if info is None else ("yes" if info.fully_integer else "no: " + ", ".join(sorted(set(info.float_ops))))
            lines.append(f"| {model} | {variant} | {ev['accuracy']:.2%} | {size:,} | {kernels} | {integer} | {check} | "
                         f"{ev['latency_ms']:.3f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"MNIST-1D generated offline by `mnist1d` (4,000 train / 1,000 test signals of length 40); float "
                  f"training {EPOCHS['mnist1d_cnn']} (CNN) / {EPOCHS['mnist1d_lstm']} (LSTM) epochs (Adam 2e-3), then quantize, `qx.calibrate` on 500 signals, QAT "
                  f"{QAT_EPOCHS} epochs (Adam 1e-4), export verified on 300 training signals; accuracy of each "
                  "file in the TFLite runtime on the 1,000 test signals; the LSTM is one integer UNIDIRECTIONAL_SEQUENCE_LSTM "
                  "(int8 weights per gate, int16 cell state).",
              f"Machine: {platform.platform()}, {os.cpu_count()} CPUs; {time.perf_counter() - start:.0f} s. "
              "Rerun: `python bench/mnist1d_models.py`"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    write_atomic(os.path.join(HERE, "results", "mnist1d.md"), ("# MNIST-1D\n\n" + text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
