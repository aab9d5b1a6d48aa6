"""Issue 11 (last part): an integer LSTM in the TFLite file that agrees with Keras.

Measures, on ``keras_qx.data.mnist1d_lstm`` (20 float epochs, seed 0):

1. Full-int8 post-training conversion of the float model (``qx.ptq(model, "int8")``): the
   converter fuses the LSTM into one UNIDIRECTIONAL_SEQUENCE_LSTM; its weight and state types,
   accuracy, and how far the file's logits are from the float model's.
2. keras_qx QAT (the LSTM in a quantize wrapper, its kernels quantized per gate), exported: the
   file as the converter writes it, and with its LSTM gate biases rescaled to the input scale the
   kernel uses (``keras_qx.lite.convert.fix_lstm_bias_scales``, what ``export_tflite`` does): the
   converter quantizes them at the LSTM input's calibrated scale, the input keeps its trained one.
3. GRU and SimpleRNN in place of the LSTM: what full-int8 conversion makes of them (each in a
   child process: the converter has crashed on them before), and ``qx.quantize`` + export (they
   stay float inside, the rest integer).

Run: python bench/int_lstm.py   (about 2 minutes on 2 cores; writes bench/results/int_lstm.md)
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import keras_qx as qx  # noqa: E402
from keras_qx._compat import keras  # noqa: E402
from keras_qx._seed import seeded  # noqa: E402
from keras_qx._io import write_atomic  # noqa: E402
from keras_qx.data import load_mnist1d, mnist1d_lstm  # noqa: E402
from keras_qx._compat import tf  # noqa: E402
from keras_qx.lite.bias_grid import snap_biases  # noqa: E402
from keras_qx.lite.convert import convert, converter_for, fix_lstm_bias_scales, representative  # noqa: E402
from keras_qx.lite.inspect import TFLiteRunner  # noqa: E402
from keras_qx.lite.verify import verify  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
EPOCHS, QAT_EPOCHS = 20, 3
L = keras.layers


def recurrent_model(kind: str, seed: int = 0):
    """mnist1d_lstm with ``kind`` (LSTM, GRU, SimpleRNN) as its recurrent layer."""
    if kind == "LSTM":
        return mnist1d_lstm(seed)
    with seeded(seed):
        inputs = keras.Input((40, 1), name="signal")
        x = L.Conv1D(32, 5, padding="same", activation="relu", name="conv1")(inputs)
        x = L.MaxPooling1D(2, name="pool1")(x)
        x = getattr(L, kind)(64, name="rnn")(x)
        x = L.Dense(64, activation="relu", name="fc1")(x)
        return keras.Model(inputs, L.Dense(10, name="logits")(x), name=f"mnist1d_{kind.lower()}")


def trained(kind: str, data):
    (x, y), _ = data
    with seeded(0):
        model = recurrent_model(kind)
        model.compile(keras.optimizers.Adam(2e-3), LOSS, metrics=["accuracy"])
        model.fit(x, y, epochs=EPOCHS, batch_size=64, verbose=0)
    return model


def _details(data: bytes) -> dict:
    return {d["name"]: d for d in TFLiteRunner(bytes(data)).interpreter.get_tensor_details()}


def lstm_facts(data: bytes) -> dict:
    """Types of the fused LSTM's operands in a file: weights, state tensors, output."""
    det = _details(data)
    info = qx.inspect_tflite(data)
    gates = [w for w in info.weights if len(w[2]) == 2 and w[2][0] == 64 and w[2][1] in (32, 64)
             and not any(k in w[0] for k in ("fc1", "logits"))]  # the LSTM's 8 gate matrices
    state = [d for d in det.values() if d["dtype"] == np.int16]
    return {"ops": info.ops, "fully_integer": info.fully_integer, "gate_weights": sorted({w[1] for w in gates}),
            "n_gate_weights": len(gates), "int16_tensors": len(state)}


def trained_qat(model, x, y):
    """The default-policy QAT model: calibrated on 500 signals, then QAT_EPOCHS epochs (seed 0)."""
    with seeded(0):
        qat = qx.calibrate(qx.quantize(model), x[:500])
        qat.compile(keras.optimizers.Adam(1e-4), LOSS, metrics=["accuracy"])
        qat.fit(x, y, epochs=QAT_EPOCHS, batch_size=64, verbose=0)
    return qat


def lstm_qat_rows(model, data) -> list:
    """The QAT model's file as converted, and with its LSTM biases rescaled (what export does)."""
    (x, y), (xt, yt) = data
    qat = trained_qat(model, x, y)
    keras_acc = qat.evaluate(xt, yt, verbose=0)[1]
    snap_biases(qat)  # as export_tflite does first
    converter = converter_for(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative([x[:300]], qat)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    raw = convert(converter)[0]
    count = fix_lstm_bias_scales(raw)[1]
    fixed = bytes(qx.export_tflite(qat, x[:300], verify=False))
    rows = []
    for label, data_ in (("as converted", raw), (f"{count} LSTM biases rescaled (export_tflite)", fixed)):
        ver = verify(qat, data_, x[:300])
        rows.append((label, qx.evaluate_tflite(data_, xt, yt)["accuracy"], len(data_),
                     qx.inspect_tflite(data_).fully_integer, ver))
    return keras_acc, rows


def child(kind: str) -> None:
    """Full-int8 conversion of an untrained ``kind`` model (a crash kills only this process)."""
    model = recurrent_model(kind)
    x = np.random.default_rng(0).normal(size=(64, 40, 1)).astype("float32")
    tfl = qx.ptq(model, "int8", x, int8_io=True, verify=False)
    info = qx.inspect_tflite(tfl)
    print(json.dumps({"ops": info.ops, "float_ops": sorted(set(info.float_ops)), "bytes": len(tfl)}))


def convert_in_child(kind: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, __file__, "--child", kind], capture_output=True, text=True, timeout=600,
                          env=env)
    if proc.returncode < 0:
        return f"the converter crashed the process (signal {-proc.returncode}{', segmentation fault' if proc.returncode == -11 else ''})"
    if proc.returncode != 0:
        errors = [l for l in proc.stderr.strip().splitlines() if "Error" in l] or proc.stderr.strip().splitlines() or [""]
        return f"converter failed (exit {proc.returncode}): {errors[-1][:160]}"
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    ops = sorted(set(facts["ops"]))
    return (f"{len(facts['ops'])} ops ({', '.join(ops)}); float ops: {', '.join(facts['float_ops']) or 'none'}")


def qat_row(model, data) -> tuple:
    (x, y), (xt, yt) = data
    qat = trained_qat(model, x, y)
    tfl = qx.export_tflite(qat, x[:300])
    ver, info = tfl.report.verification, tfl.report.info
    integer = "yes" if info.fully_integer else "no: " + ", ".join(sorted(set(info.float_ops)))
    return (qx.evaluate_tflite(tfl, xt, yt)["accuracy"], len(tfl), integer,
            f"{ver.mean_error_steps:.3f} / {ver.max_error_steps:.0f}, {ver.agreement:.1%}")


def main() -> int:
    start = time.perf_counter()
    data = load_mnist1d()
    (x, y), (xt, yt) = data
    lines = []
    model = trained("LSTM", data)
    float_acc = model.evaluate(xt, yt, verbose=0)[1]
    ptq = qx.ptq(model, "int8", x[:300], int8_io=True, verify_samples=300, min_agreement=0.0)
    facts, ver = lstm_facts(ptq), ptq.report.verification
    lines += ["## 1. Full-int8 post-training conversion of the float LSTM model", "",
              "| model | accuracy | bytes | ops | LSTM gate weights | int16 tensors | file vs float Keras: mean / max steps, top-1 |",
              "|---|---|---|---|---|---|---|",
              f"| float (Keras) | {float_acc:.2%} | - | - | - | - | - |",
              f"| int8 PTQ | {qx.evaluate_tflite(ptq, xt, yt)['accuracy']:.2%} | {len(ptq):,} | {', '.join(facts['ops'])} | "
              f"{facts['n_gate_weights']} x {'/'.join(facts['gate_weights'])} | {facts['int16_tensors']} | "
              f"{ver.mean_error_steps:.3f} / {ver.max_error_steps:.0f}, {ver.agreement:.1%} |", ""]
    keras_acc, rows = lstm_qat_rows(model, data)
    lines += ["## 2. keras_qx QAT: the LSTM's kernels per gate at 8 bits, the file's biases", "",
              "| file | accuracy | bytes | fully integer | TFLite vs Keras QAT: mean / max steps, top-1 |", "|---|---|---|---|---|",
              f"| (Keras QAT model) | {keras_acc:.2%} | - | - | - |"]
    for label, acc, size, integer, ver in rows:
        lines.append(f"| {label} | {acc:.2%} | {size:,} | {'yes' if integer else 'no'} | "
                     f"{ver.mean_error_steps:.3f} / {ver.max_error_steps:.0f}, {ver.agreement:.1%} |")
    lines.append("")
    lines += ["## 3. GRU and SimpleRNN", "", "| layer | full-int8 PTQ of the float model | keras_qx QAT export: accuracy, bytes, "
              "fully integer, TFLite vs Keras QAT mean / max steps, top-1 |", "|---|---|---|"]
    for kind in ("GRU", "SimpleRNN"):
        acc, size, integer, check = qat_row(trained(kind, data), data)
        lines.append(f"| {kind} | {convert_in_child(kind)} | {acc:.2%}, {size:,} B, {integer}, {check} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"MNIST-1D (4,000 train / 1,000 test signals), {EPOCHS} float epochs (Adam 2e-3); PTQ calibrated on "
                  f"300 training signals; QAT: qx.calibrate on 500, {QAT_EPOCHS} epochs (Adam 1e-4), export verified on 300.",
              f"Machine: {platform.platform()}, {os.cpu_count()} CPUs; {time.perf_counter() - start:.0f} s. "
              "Rerun: `python bench/int_lstm.py`"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    write_atomic(os.path.join(HERE, "results", "int_lstm.md"), ("# Integer LSTM in the TFLite file\n\n" + text + "\n").encode())
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
