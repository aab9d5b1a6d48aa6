"""LayerNormalization fidelity with depth: the exported file against its QAT model, in output
quantization steps, on transformer encoder stacks, with LayerNormalization whole (simulated by
one rounding at its output, as before issue 18) and decomposed into the int8 ops the file runs
(``keras_qx.rewrite.flatten._layer_norm``, the default now).

Model: token ids (length 16, vocabulary 64) -> Embedding(width) -> N blocks of
[MultiHeadAttention(2 heads) -> Add -> LayerNormalization -> Dense(2 * width, gelu) ->
Dense(width) -> Add -> LayerNormalization] -> GlobalAveragePooling1D -> Dense(4). Random
weights (seeded), ``qx.quantize``, ``qx.calibrate`` on 32 samples, ``qx.export_tflite`` with
the same 32 samples as representative data; the figure is the export report's mean and max
|file - QAT| over those samples' logits, in steps of the output's int8 scale.

Run:
    cd /work/wt-ln && PYTHONPATH=. /work/venv/bin/python bench/layernorm_depth.py [--depths 2 6 12] [--width 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

SEQ, VOCAB, CLASSES, SAMPLES = 16, 64, 4, 32


def encoder(blocks: int, width: int, seed: int = 0, *, heads: int = 2, vocab: int = VOCAB, ff: int = 2,
            seq: int = SEQ, name: str | None = None):
    """The encoder stack described above (tf_keras functional model); ``heads``, ``vocab``, the
    feed-forward width ``ff * width`` and the length ``seq`` as bench/scale.py sizes them."""
    from keras_qx._compat import keras

    L = keras.layers
    keras.utils.set_random_seed(seed)
    ids = keras.Input((seq,), dtype="int32", name="ids")
    x = L.Embedding(vocab, width, name="embed")(ids)
    for b in range(blocks):
        a = L.MultiHeadAttention(num_heads=heads, key_dim=width // heads, name=f"mha{b}")(x, x)
        x = L.LayerNormalization(name=f"ln{b}a")(L.Add(name=f"res{b}a")([x, a]))
        f = L.Dense(ff * width, activation="gelu", name=f"ff{b}a")(x)
        f = L.Dense(width, name=f"ff{b}b")(f)
        x = L.LayerNormalization(name=f"ln{b}b")(L.Add(name=f"res{b}b")([x, f]))
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(ids, L.Dense(CLASSES, name="head")(x), name=name or f"encoder{blocks}")


def measure(blocks: int, width: int, decompose: bool = True, seed: int = 0, kernels: bool = False) -> dict:
    """``{"mean", "max", "ops", "seconds"}`` of one encoder stack, LayerNormalization decomposed
    (the default) or kept whole (``decompose=False``: the simulation before issue 18);
    ``kernels``: also ``"kernels"``, the same file run by the built-in int8 kernels against its
    XNNPACK run (mean, max output steps): how far two correct runtimes of one file drift apart."""
    import keras_qx as qx
    from keras_qx._compat import keras
    from keras_qx.rewrite import flatten

    start = time.perf_counter()
    keras.backend.clear_session()
    model = encoder(blocks, width, seed)
    x = np.random.default_rng(seed).integers(0, VOCAB, (SAMPLES, SEQ)).astype("int32")
    plain = flatten._plain_layer_norm
    if not decompose:
        flatten._plain_layer_norm = lambda layer: False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat = qx.calibrate(qx.quantize(model), x)
            tfl = qx.export_tflite(qat, x, min_agreement=0.0)
    finally:
        flatten._plain_layer_norm = plain
    report = tfl.report
    out = {"mean": float(report.mean_error_steps), "max": float(report.max_error_steps),
           "ops": len(report.info.ops), "seconds": time.perf_counter() - start}
    if kernels:
        from coverage import _kernels_apart
        from keras_qx.lite.inspect import TFLiteRunner

        runner = TFLiteRunner(bytes(tfl))
        out["kernels"] = _kernels_apart(bytes(tfl), x, runner.predict(x), runner.output_step)
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 6, 12])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--kernels", action="store_true",
                        help="decomposed only, beside the same file on the built-in kernels vs XNNPACK")
    args = parser.parse_args(argv)
    if args.kernels:
        lines = ["| blocks | file vs QAT model: mean | max | built-in vs XNNPACK, same file: mean | max | seconds |",
                 "|---:|---:|---:|---:|---:|---:|"]
        for blocks in args.depths:
            r = measure(blocks, args.width, kernels=True)
            lines.append(f"| {blocks} | {r['mean']:.2f} | {r['max']:.0f} | {r['kernels'][0]:.2f} | "
                         f"{r['kernels'][1]:.0f} | {r['seconds']:.0f} |")
            print(lines[-1], flush=True)
        return "\n".join(lines)
    lines = [f"Encoder stacks of width {args.width}, calibrated on {SAMPLES} samples: |file - QAT model| "
             "in output steps (mean / max over the samples' logits).", "",
             "| blocks | LN whole (before): mean | max | LN decomposed (now): mean | max | file ops now | seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for blocks in args.depths:
        before = measure(blocks, args.width, decompose=False)
        after = measure(blocks, args.width, decompose=True)
        lines.append(f"| {blocks} | {before['mean']:.2f} | {before['max']:.0f} | {after['mean']:.2f} | "
                     f"{after['max']:.0f} | {after['ops']} | {before['seconds'] + after['seconds']:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
