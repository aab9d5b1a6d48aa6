"""The main job on the embedded default: digits CNN -> float / uniform int8 / auto mixed TFLite.

The mixed model's bits come from ``qx.auto_policy`` under a kernel-byte budget (default 0.6x
the uniform-int8 kernels), unless a policy is given.

Example:
    >>> rows = run_demo(epochs=2, qat_epochs=1, print_fn=print)   # doctest: +SKIP
"""
from __future__ import annotations

import os
import time

from keras_qx._compat import keras
from keras_qx._seed import seeded
from keras_qx.data import digits_cnn, load_digits
from keras_qx.engine.allocate import auto_policy, budget_from, parse_budget, split_budget
from keras_qx.engine.sensitivity import quantizable_layers
from keras_qx.lite.convert import convert, converter_for
from keras_qx.lite.evaluate import evaluate_tflite
from keras_qx._io import write_atomic
from keras_qx.lite.export import export_tflite
from keras_qx.quant.policy import Policy
from keras_qx.qat.quantize import quantize
from keras_qx.qat.summary import summary

__all__ = ["MIXED_POLICY", "run_demo", "format_table", "train_digits"]

# 4-bit Dense/Conv, first conv and last dense kept at 8 bits.
MIXED_POLICY = Policy.from_dict({
    "default": {"weight_bits": 8, "activation_bits": 8},
    "rules": [{"type": "Dense", "weight_bits": 4}, {"type": "Conv2D", "weight_bits": 4}],
    "layers": {"conv1": {"weight_bits": 8}, "logits": {"weight_bits": 8}},
})


def _compile(model, lr=1e-3):
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def _float_tflite(model) -> bytes:
    return convert(converter_for(model))[0]


def train_digits(epochs: int = 20, seed: int = 0, print_fn=print):
    """The float digits CNN trained on the embedded data: ``model, (train, test)``."""
    say = print_fn or (lambda *_: None)
    (x_train, y_train), (x_test, y_test) = load_digits(seed=seed)
    say(f"training the float digits CNN ({len(x_train)} images, {epochs} epochs)...")
    start = time.perf_counter()
    with seeded(seed):
        model = _compile(digits_cnn(seed=seed))
        model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    say(f"      done in {time.perf_counter() - start:.1f}s")
    return model, ((x_train, y_train), (x_test, y_test))


def run_demo(epochs: int = 20, qat_epochs: int = 4, out_dir: str | None = None, policy=None,
             budget: str = "0.6x", seed: int = 0, print_fn=print) -> list[dict]:
    """Train, quantize (uniform 8-bit and ``policy`` or auto_policy under ``budget``), QAT,
    export, evaluate; return the rows. Seeded by ``seed``; the caller's random state is kept."""
    with seeded(seed):
        return _run_demo(epochs, qat_epochs, out_dir, policy, budget, seed, print_fn)


def _run_demo(epochs, qat_epochs, out_dir, policy, budget, seed, print_fn) -> list[dict]:
    say = print_fn or (lambda *_: None)
    if policy is None:
        if split_budget(budget)[1] is not None:  # a bad budget fails before training
            raise ValueError(f"the demo takes a size budget, got {budget!r}; for a latency budget run "
                             "keras-qx quantize --budget 0.6x,2ms (on the demo's model by default).")
    else:
        policy = Policy.coerce(policy)  # and so does a bad policy
    model, ((x_train, y_train), (x_test, y_test)) = train_digits(epochs, seed, lambda s: say(s if s.startswith(" ") else "[1/4] " + s))
    if policy is None:
        budget_bytes = budget_from(quantizable_layers(model), budget)
        say(f"      auto_policy: sensitivity + exact allocation under {budget_bytes:,} kernel bytes ({budget})")
        policy = auto_policy(model, x_train, y_train, budget=budget_bytes, verbose=0)
        chosen = ", ".join(f"{n}={f['weight_bits']}" for n, f in policy.layers.items())
        say(f"      chosen weight bits: {chosen}")
    else:
        policy = Policy.coerce(policy)
    float_bytes = _float_tflite(model)
    rows = [{"model": "float32", **evaluate_tflite(float_bytes, x_test, y_test)}]
    for step, (name, pol) in enumerate([("int8 (uniform)", Policy.uniform()), ("mixed (auto)", policy)], 2):
        say(f"[{step}/4] {name}: QAT {qat_epochs} epochs, export, verify...")
        start = time.perf_counter()
        qat = _compile(quantize(model, pol), lr=1e-4)
        qat.fit(x_train, y_train, epochs=qat_epochs, batch_size=64, verbose=0)
        path = os.path.join(out_dir, f"digits_{name.split()[0]}.tflite") if out_dir else None
        tfl = export_tflite(qat, x_train[:300], path)
        for line in tfl.report.lines():
            say("      " + line)
        summary(qat, print_fn=lambda s: say("      " + s))
        rows.append({"model": name, **evaluate_tflite(tfl, x_test, y_test),
                     "int4_tensors": len(tfl.report.info.int4_tensors)})
        say(f"      done in {time.perf_counter() - start:.1f}s")
    if out_dir:
        write_atomic(os.path.join(out_dir, "mixed_policy.json"), policy.to_json().encode())
        write_atomic(os.path.join(out_dir, "digits_float.tflite"), float_bytes)
    say("[4/4] results (TFLite runtime, test split):")
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of the demo rows, with size ratios against float32 and uniform int8."""
    base = {r["model"]: r for r in rows}
    int8 = base.get("int8 (uniform)", rows[0])["size_bytes"]
    head = "| model | accuracy | bytes | gzip bytes | vs int8 | INT4 tensors | latency ms |"
    out = [head, "|" + "---|" * 7]
    for r in rows:
        out.append(f"| {r['model']} | {r['accuracy']:.2%} | {r['size_bytes']:,} | {r['gzip_bytes']:,} | "
                   f"{r['size_bytes'] / int8:.2f}x | {r.get('int4_tensors', 0)} | {r['latency_ms']:.3f} |")
    return "\n".join(out)
