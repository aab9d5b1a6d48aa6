"""The 2-bit weight grid study (issue 12): 3 symmetric levels {-1, 0, 1}*s against 4 levels
{-2, -1, 0, 1}*s (the INT2 range) for a layer trained at 2 bits, on the digits CNN and the
MNIST-1D CNN with fc1 at 2 bits (everything else 8-bit), 3 seeds each. Writes
bench/results/int2_grid.json, which bench/int2.py renders into bench/results/int2.md.

Grids (all of fc1's kernel, per tensor, after a float model is trained and quantized):
- ``sym3``: keras_qx's WeightQuantizer, s = max|w| (narrow range, 3 levels);
- ``sym3-half``: 3 levels at the step of ``4level-half``: s = M/2 (clips at +-M/2);
- ``4level-twos``: tfmot's two's-complement range [-2a, a], a = max(max w, -min w / 2) (no clipping);
- ``4level-half``: [-M, M/2], s = M/2 with M = max|w| (the positive tail clips at M/2).

Accuracy is the QAT model's (Keras) on the test split, and for sym3 also the exported file's.

Run: python bench/int2_grid.py [grid ...]   (about 4 minutes on 2 shared cores for all grids)
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import keras_qx as qx  # noqa: E402
from keras_qx._compat import keras, quant_ops, tf  # noqa: E402
from keras_qx._seed import seeded  # noqa: E402
from keras_qx.data import digits_cnn, load_digits, load_mnist1d, mnist1d_cnn  # noqa: E402
from keras_qx.quant.policy import Policy  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
POLICY = Policy.from_dict({"default": {"weight_bits": 8, "activation_bits": 8},
                           "layers": {"fc1": {"weight_bits": 2}}})
TASKS = {"digits CNN": (load_digits, lambda s: digits_cnn(16, 64, seed=s), 10, 3),
         "MNIST-1D CNN": (load_mnist1d, mnist1d_cnn, 20, 3)}
SEEDS = (0, 1, 2)
GRIDS = tuple(sys.argv[1:]) or ("sym3", "sym3-half", "4level-twos", "4level-half")


@contextlib.contextmanager
def grid(name: str):
    """Swap the 2-bit weight fake-quant for the grid ``name`` (8-bit quantizers untouched)."""
    original = quant_ops.LastValueQuantize

    def patched(x, min_var, max_var, **kw):
        if kw.get("num_bits") != 2 or name == "sym3":
            return original(x, min_var, max_var, **kw)
        if name == "sym3-half":  # 3 levels at the 4-level grid's step: s = M/2, clipping at +-M/2
            if kw["is_training"]:
                m = tf.reduce_max(tf.abs(x))
                min_var, max_var = min_var.assign(-m / 2), max_var.assign(m / 2)
            return tf.quantization.fake_quant_with_min_max_vars(x, min_var, max_var, num_bits=2, narrow_range=True)
        if name == "4level-twos":
            return original(x, min_var, max_var, **{**kw, "narrow_range": False})
        if kw["is_training"]:
            m = tf.reduce_max(tf.abs(x))
            min_var, max_var = min_var.assign(-m), max_var.assign(m / 2)
        return tf.quantization.fake_quant_with_min_max_vars(x, min_var, max_var, num_bits=2, narrow_range=False)

    quant_ops.LastValueQuantize = patched
    try:
        yield
    finally:
        quant_ops.LastValueQuantize = original


def _compile(model, lr):
    model.compile(keras.optimizers.Adam(lr), LOSS, metrics=["accuracy"])
    return model


def main() -> int:
    start = time.perf_counter()
    rows = []
    for task, (load, build, epochs, qat_epochs) in TASKS.items():
        (x, y), (xt, yt) = load()
        for seed in SEEDS:
            with seeded(seed):
                model = _compile(build(seed), 2e-3)
                model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
            float_acc = float((model.predict(xt, verbose=0).argmax(1) == yt).mean())
            for name in GRIDS:
                with grid(name), seeded(seed):
                    qat = _compile(qx.calibrate(qx.quantize(model, POLICY), x[:500]), 1e-4)
                    qat.fit(x, y, epochs=qat_epochs, batch_size=64, verbose=0)
                    acc = float((qat.predict(xt, verbose=0).argmax(1) == yt).mean())
                    fc1 = next(l for l in qat.layers if l.name == "quant_fc1")
                    weight, quantizer, qvars = fc1._weight_vars[0]
                    levels = int(np.unique(quantizer(weight, False, qvars).numpy()).size)
                tfl_acc = None
                if name == "sym3":
                    tfl = qx.export_tflite(qat, x[:300])
                    tfl_acc = float(qx.evaluate_tflite(tfl, xt, yt)["accuracy"])
                rows.append({"task": task, "seed": seed, "grid": name, "float": float_acc, "keras": acc,
                             "tflite": tfl_acc, "levels": levels})
                print(rows[-1], flush=True)
    out = os.path.join(HERE, "results", "int2_grid.json")
    if os.path.exists(out):  # a run of some grids replaces only their rows
        with open(out) as fh:
            rows = [r for r in json.load(fh)["rows"] if r["grid"] not in GRIDS] + rows
    with open(out, "w") as fh:
        json.dump({"rows": rows}, fh, indent=1)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
