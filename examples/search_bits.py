"""Search per-layer weight bits for the digits CNN under a size budget, with KerasTuner.

The first trial is qx.auto_policy's allocation; the search (Bayesian by default) then tries
other mixes, never training one over the budget. Re-running the script resumes the search in
``search_bits/`` instead of starting again (pass --overwrite to start afresh).

Run:
    python examples/search_bits.py [--trials 8] [--budget 0.6x] [--overwrite]
"""
import argparse

import tf_keras as keras

import keras_qx as qx
from keras_qx.data import digits_cnn, load_digits

parser = argparse.ArgumentParser()
parser.add_argument("--trials", type=int, default=8)
parser.add_argument("--budget", default="0.6x", help="kernel bytes, or a fraction of int8's like 0.6x")
parser.add_argument("--overwrite", action="store_true")
args = parser.parse_args()

(x, y), (x_test, y_test) = load_digits()
x_val, y_val = x[-270:], y[-270:]
x, y = x[:-270], y[:-270]

model = digits_cnn()
model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
model.fit(x, y, epochs=10, batch_size=64, verbose=0)

tuner = qx.BitWidthTuner(model, candidates=(4, 8), budget=args.budget, max_trials=args.trials,
                         directory="search_bits", overwrite=args.overwrite, seed=0)
tuner.search(x, y, validation_data=(x_val, y_val), epochs=2, batch_size=64)
tuner.results_summary()

policy = tuner.get_best_policies()[0]
print(policy.to_json())
tflite = qx.export_tflite(tuner.best_model(), x[:300], "search_bits/best.tflite")
print(qx.evaluate_tflite(tflite, x_test, y_test))
