"""Embedding tables at 8/4/2 bits: file bytes, file vs QAT model, single-sample latency.

A 20,000 x 64 Embedding -> GlobalAveragePooling1D -> Dense(4) on int32 ids of length 32 (trained
one epoch on a synthetic task), and the Embedding alone (the lookup's latency), each QAT-trained
at 8, 4 and 2 table bits and exported (verified on the representative samples), timed by
qx.evaluate_tflite (one thread). Results: bench/results/embedding_bits.md.

Usage: python bench/embedding_bits.py
"""
import numpy as np

import keras_qx as qx
from keras_qx._compat import keras

L = keras.layers
VOCAB, WIDTH, LENGTH = 20000, 64, 32


def build(head: bool):
    keras.utils.set_random_seed(0)
    ids = keras.Input((LENGTH,), dtype="int32")
    h = L.Embedding(VOCAB, WIDTH, name="emb")(ids)
    if head:
        h = L.Dense(4, name="fc")(L.GlobalAveragePooling1D()(h))
    return keras.Model(ids, h)


def main():
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (512, LENGTH)).astype("int32")
    y = x[:, 0] % 4
    print("| table bits | stored | file bytes | gzip bytes | file vs QAT (mean / max steps) "
          "| latency, model | latency, lookup alone |")
    print("|---|---|---|---|---|---|---|")
    for bits in (8, 4, 2):
        row = []
        for head in (True, False):
            qat = qx.quantize(build(head), {"layers": {"emb": {"weight_bits": bits}}})
            if head:
                qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                qat.fit(x, y, epochs=1, batch_size=64, verbose=0)
            qx.calibrate(qat, x[:64])
            tfl = qx.export_tflite(qat, x[:128])
            row.append((tfl, qx.evaluate_tflite(tfl, x[:200], y[:200]) if head else qx.evaluate_tflite(tfl, x[:200])))
        (tfl, ev), (_, lookup) = row
        v = tfl.report.verification
        stored = [w[1] for w in tfl.report.info.weights if w[2] == (VOCAB, WIDTH)][0]
        print(f"| {bits} | {stored} | {len(bytes(tfl)):,} | {ev['gzip_bytes']:,} | {v.mean_error_steps:.3f} / "
              f"{v.max_error_steps:.0f} | {ev['latency_ms'] * 1000:.1f} us | {lookup['latency_ms'] * 1000:.1f} us |")


if __name__ == "__main__":
    main()
