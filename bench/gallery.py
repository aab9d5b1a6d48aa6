"""The gallery corpus (tests/gallery.py) through keras_qx and through tfmot's ``quantize_model``.

For each model: train the float model briefly, then
- keras_qx: ``qx.quantize`` (default policy) -> ``qx.calibrate`` (64 samples) -> one QAT epoch ->
  ``qx.export_tflite`` (verified) -> the file run on the test set;
- tfmot: ``quantize_model`` -> one QAT epoch -> ``TFLiteConverter.from_keras_model`` with
  ``Optimize.DEFAULT`` and a representative dataset (64 samples) -> the file run on the test set.
Each road is wrapped in try/except: a failure records the step and the first line of the error.

Prints the table and writes bench/results/gallery.md.

Run:
    cd /work/main && /work/venv/bin/python bench/gallery.py [name ...]
"""
from __future__ import annotations

import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_qx._compat import keras  # noqa: E402
from keras_qx._io import write_atomic  # noqa: E402

import gallery as g  # noqa: E402

RESULTS = os.path.join(HERE, "results", "gallery.md")


def log(msg: str) -> None:
    print(f"[gallery {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(kinds, values) -> str:
    if values is None:
        return "-"
    return ", ".join(f"{v:.1%}" if k != "mse" else f"mse {v:.4f}" for k, v in zip(kinds, values))


def error_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception encountered when calling"):
        lines = [f"{lines[0]} {lines[1]}"]  # Keras wraps the error: its second line is the cause
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text.replace("|", "/")[:240]


def bench_one(name: str) -> dict:
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    task = g.GALLERY[name]()
    g.train_float(task)
    row = {"name": name, "kinds": task.metrics}
    qx = {}
    start = time.perf_counter()
    try:
        g.run_keras_qx(task, result=qx)
        row["qx"] = "ok"
    except Exception as err:  # noqa: BLE001 -- the table records every failure
        row["qx"] = f"fail at {qx.get('stage')}: {error_line(err)}"
        log(f"{name}: keras_qx {row['qx']}\n{traceback.format_exc(limit=3)}")
    row["qx_s"] = time.perf_counter() - start
    row.update({"float": qx.get("float"), "qat": qx.get("qat"), "file": qx.get("file"), "bytes": qx.get("bytes"),
                "mean_steps": qx.get("mean_steps"), "max_steps": qx.get("max_steps")})
    keras.utils.set_random_seed(0)
    tm = {}
    try:
        g.run_tfmot(task, result=tm)
        row["tfmot"] = "ok"
    except Exception as err:  # noqa: BLE001
        row["tfmot"] = f"fail at {tm.get('stage')}: {error_line(err)}"
    row["tfmot_file"], row["tfmot_bytes"] = tm.get("file"), tm.get("bytes")
    log(f"{name}: keras_qx {row['qx']} / tfmot {row['tfmot']}")
    return row


def table(rows: list) -> list:
    out = ["| model | keras_qx | float | keras_qx file | bytes | mean / max steps | tfmot quantize_model | tfmot file |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = "-" if r["mean_steps"] is None else f"{r['mean_steps']:.2f} / {r['max_steps']:.0f}"
        out.append(f"| {r['name']} | {r['qx']} | {fmt(r['kinds'], r['float'])} | {fmt(r['kinds'], r['file'])} | "
                   f"{r['bytes'] or '-'} | {steps} | {r['tfmot']} | {fmt(r['kinds'], r['tfmot_file'])} |")
    return out


def main(names: list) -> None:
    rows = []
    for name in names:
        log(f"{name} ...")
        rows.append(bench_one(name))
    lines = table(rows)
    print("\n".join(lines))
    n_qx = sum(r["qx"] == "ok" for r in rows)
    n_tm = sum(r["tfmot"] == "ok" for r in rows)
    doc = [
        "# The gallery corpus through keras_qx and tfmot",
        "",
        f"`bench/gallery.py`, {time.strftime('%Y-%m-%d')}: {len(rows)} models of tests/gallery.py, written in the style of "
        "the keras.io examples (custom layers, a subclassed model, token ids with a None axis, several inputs and "
        "outputs). Each float model trained briefly on its small task, then keras_qx (default policy, calibrate 64 "
        "samples, one QAT epoch, `export_tflite` verified) and tfmot (`quantize_model`, one QAT epoch, "
        "`TFLiteConverter.from_keras_model` with `Optimize.DEFAULT` and 64 representative samples, float I/O). "
        "File metrics on the test split, run in the TFLite runtime; \"mean / max steps\" is the export "
        "verification's error of the file against its QAT model, in output quantization steps. "
        "A failure gives the step and the first line of the error.",
        "",
        f"keras_qx: {n_qx}/{len(rows)} files; tfmot: {n_tm}/{len(rows)}.",
        "",
        *lines,
        "",
    ]
    if names == list(g.GALLERY):
        write_atomic(RESULTS, "\n".join(doc).encode())
        log(f"wrote {RESULTS}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(g.GALLERY))
