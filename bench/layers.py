"""Every public layer class of tf_keras.layers: keras_qx's treatment, measured in the exported
file, and whether tfmot's ``quantize_model`` takes it.

Each class runs in the tiny model of tests/layer_cases.py (the layer alone, or followed by a
Dense head when kept float): ``qx.quantize``, ``qx.calibrate`` on 16 random samples,
``qx.export_tflite``; the cell lists the file's ops (float ones marked), the kernels' storage
types and the TFLite-vs-Keras output error in output quantization steps. tfmot: ``quantize_model``
on the same float model ("yes" = it returns a QAT model; conversion not tried).

Run:
    cd /work/main && PYTHONPATH=. /work/venv/bin/python bench/layers.py   # ~5 min on 2 cores
"""
from __future__ import annotations

import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests.layer_cases

ORDER = ["quantized", "pass-through", "identity", "kept float", "refused", "not a model layer", "unknown"]


def _tfmot(name) -> str:
    from keras_qx._compat import keras, tfmot
    from tests.layer_cases import CASES

    keras.backend.clear_session()
    model, _ = CASES[name]()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tfmot.quantization.keras.quantize_model(model)
        return "yes"
    except Exception as err:  # tfmot raises RuntimeError/ValueError/TypeError...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"no: {type(err).__name__}: {first[:90]}"


def _cell(got) -> str:
    if "error" in got:
        return "refused: " + got["error"].split(": ", 1)[-1][:160].replace("|", "/")
    floats = set(got["float_ops"])
    ops = []
    for op in got["ops"]:
        shown = f"**{op}** (float)" if op in floats else op
        if shown not in ops:
            ops.append(shown)
    kernels = ", ".join(sorted(set(got["kernels"]))) or "-"
    return f"{' '.join(ops) or '(no ops)'}; kernels {kernels}; error {got['mean']:.2f} / {got['max']:.2f} steps"


def main() -> int:
    from keras_qx._io import write_atomic
    from tests.layer_cases import CASES, NOT_A_MODEL_LAYER, label, layer_classes, measure

    start = time.time()
    classes = layer_classes()
    rows, counts, tfmot_yes = [], {}, 0
    for name in sorted(classes, key=lambda n: (ORDER.index(label(n)), n)):
        kind = label(name)
        counts[kind] = counts.get(kind, 0) + 1
        if name in NOT_A_MODEL_LAYER:
            rows.append(f"| {name} | not a model layer: {NOT_A_MODEL_LAYER[name]} | - | - |")
            continue
        if name not in CASES:
            rows.append(f"| {name} | unknown (no case) | - | - |")
            continue
        try:
            cell = _cell(measure(name))
        except Exception as err:  # a raw error is a finding: show it
            cell = f"ERROR {type(err).__name__}: {str(err)[:160]}"
            kind = "error"
            counts["error"] = counts.get("error", 0) + 1
        tf_cell = _tfmot(name)
        tfmot_yes += tf_cell == "yes"
        rows.append(f"| {name} | {kind} | {cell} | {tf_cell.replace('|', '/')} |")
        print(name, kind, cell[:100], "|", tf_cell[:40], flush=True)
    constructible = len(classes) - counts.get("not a model layer", 0)
    summary = ", ".join(f"{k}: {counts[k]}" for k in ORDER + ["error"] if counts.get(k))
    lines = [
        "# Every tf_keras layer class: keras_qx's treatment vs tfmot",
        "",
        f"`python bench/layers.py` ({time.time() - start:.0f} s). {len(classes)} public layer classes in "
        f"`tf_keras.layers` (aliases once), {constructible} constructible as a model layer. keras_qx: {summary}. "
        f"tfmot's `quantize_model` takes {tfmot_yes} of the {constructible}.",
        "",
        "Each class in a tiny model (tests/layer_cases.py), quantized (8-bit), calibrated on 16 random samples and "
        "exported to int8 TFLite. Cell: the file's op types (**float** ones marked), its kernels' storage types, "
        "and TFLite vs Keras QAT output error (mean / max, output quantization steps). Kept float: the layer "
        "computes in float32 in the file (no integer kernel), with a warning; refused: `qx.quantize` raises a "
        "PolicyError naming why and the fix. Two-input rows (Subtract, Concatenate, Attention...): see the note "
        "below on their error column.",
        "",
        "| class | keras_qx | TFLite file (measured) | tfmot quantize_model |",
        "|---|---|---|---|",
        *rows,
        "",
        "Two-input models (inputs `a`, `b`): the TFLite file lists its inputs as (b, a); keras_qx feeds a file's "
        "inputs by name (fixed in this version: before, Subtract, Concatenate and the attention layers showed "
        "45-95 steps from feeding them swapped).",
    ]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    write_atomic(os.path.join(HERE, "results", "layers.md"), ("\n".join(lines) + "\n").encode())
    print(summary, f"tfmot: {tfmot_yes}/{constructible}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
